"""benchmarks/gpu.py cannot run here for real; its dry run (CPU, tiny model) proves the script works end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu.py"),
            "--dry-run",
            "--cache-dir",
            str(cache_dir),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "Machine: cpu" in text and "| configuration | scheduler | batch | s/image |" in text
    # The reference and the two diffusers configurations ran every cell; the others say why they did not.
    import json

    report = json.loads(out.read_text())
    by_name = {c["name"]: c for c in report["configs"]}
    for name in ("diffusers fp16 (plain)", "ours: diffusers"):
        cells = by_name[name]["cells"]
        assert len(cells) == 4 and all(c["s_per_image"] > 0 for c in cells)
        assert all(c["pixel_mae"] is not None for c in cells)
    assert by_name["ours: deepspeed"]["note"].startswith("could not start: ModelLoadError")
    assert "no CUDA device" in by_name["ours: deepspeed"]["note"]
    assert "skipped in the dry run" in by_name["ours: diffusers + torch.compile"]["note"]
