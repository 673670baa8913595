"""Process-level faults with the real processes (see process_faults.py): a SIGKILLed server comes back ready,
and a SIGKILLed batch run resumes without a duplicate, a missing row or a partial image."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import process_faults

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)  # two server start-ups and a few dozen requests: minutes on a loaded 2-core machine
def test_sigkill_under_load_then_restart_back_to_ready(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    outcome = process_faults.sigkill_under_load(tiny_model_dir, cache_dir, tmp_path, clients=3)
    assert outcome["connection error (the kill)"] == 3 and outcome["200 after the restart"] == 1
    assert outcome["200 before the kill"] >= 6


@pytest.mark.timeout(1800)
def test_batch_killed_mid_run_resumes_without_loss(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Breaks if the rerun stops skipping images already on disk (BatchRunner._done): the counts move."""
    outcome = process_faults.batch_killed_and_resumed(tiny_model_dir, cache_dir, tmp_path, prompts=16)
    assert outcome["rows in predictions.csv"] == 16
    assert outcome["images before the kill"] + outcome["generated on the rerun"] == 16
