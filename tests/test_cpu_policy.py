"""The CPU thread policy: passive OpenMP waits set before torch loads, and cores shared between workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_endpoint.cpu_policy import worker_threads

REPO = Path(__file__).resolve().parents[1]


def policy_after(code: str, **env: str) -> str:
    """OMP_WAIT_POLICY in a fresh interpreter after ``code`` ran (and torch was imported after it)."""
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    script = f"{code}\nimport os, torch\nprint(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run(
        [sys.executable, "-c", script], env={**clean, **env}, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_entry_points_set_a_passive_wait_policy_before_torch_loads() -> None:
    cli = "from sd_endpoint.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert policy_after(cli) == "PASSIVE"
    score = "import importlib.util\nspec = importlib.util.spec_from_file_location('s', 'score.py')\n"
    score += "spec.loader.exec_module(importlib.util.module_from_spec(spec))"
    assert policy_after(score) == "PASSIVE"
    assert policy_after("import sd_endpoint.batch") == "None"  # importing the library changes nothing
    assert policy_after(cli, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice wins


def test_prefer_passive_waits_is_too_late_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401

    from sd_endpoint.cpu_policy import prefer_passive_waits

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert prefer_passive_waits() is False
    assert "OMP_WAIT_POLICY" not in os.environ


def test_workers_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_threads(2, cores=2) == 1
    assert worker_threads(2, cores=16) == 8
    assert worker_threads(3, cores=16) == 5
    assert worker_threads(4, cores=2) == 1  # never zero
    assert worker_threads(1, cores=16) is None  # one worker: torch's default (every core)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(2, cores=16) is None  # the user's setting wins
