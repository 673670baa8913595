"""benchmarks/gpu.py cannot run here for real; its dry run (CPU, tiny model) proves the script works end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402 - benchmarks/ is a folder of scripts, not a package


def test_a_compiling_configuration_is_not_started_when_its_compile_cannot_finish() -> None:
    # The default took 150 s to compile and start: fp8 (which compiles) is skipped with 100 s left, so that
    # DeepSpeed (which does not) still runs; with 200 s left it starts.
    assert gpu.start_skipped(100.0, compiles=True, compile_s=150.0) == (
        "skipped: 100 s of the budget left; the default took 150 s to compile and start"
    )
    assert gpu.start_skipped(200.0, compiles=True, compile_s=150.0) is None
    assert gpu.start_skipped(100.0, compiles=False, compile_s=150.0) is None
    assert gpu.start_skipped(100.0, compiles=True, compile_s=None) is None  # no default measured: no estimate
    assert gpu.start_skipped(-1.0, compiles=False, compile_s=None) == "skipped: time budget"


def test_the_benchmark_keys_its_compile_cache_as_a_server_process_does(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The warm-restart probe is a fresh server process: it finds the cache the default configuration filled
    only if both hand build_backend the same source, which the compile cache's key includes."""
    import argparse

    import sd_endpoint.model.fast_load as fast_load
    import sd_endpoint.model.loading as loading
    from sd_endpoint.backends import create_backend, selection
    from sd_endpoint.settings import load_settings

    seen: list[str] = []
    monkeypatch.setattr(selection, "build_backend", lambda settings, pipe, **kw: seen.append(kw["source"]))
    monkeypatch.setattr(gpu, "load", lambda *a: object())
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **kw: object())
    monkeypatch.setattr(fast_load, "start_load", lambda *a, **kw: None)
    args = argparse.Namespace(size=64, device="cpu", dtype="float32", cache_dir=tmp_path)
    gpu.build("default", args, tiny_model_dir, [1], tmp_path / "compile")
    create_backend(load_settings(model=str(tiny_model_dir), device="cpu", dtype="float32", cache_dir=tmp_path))
    assert seen == [f"diffusers:{tiny_model_dir}"] * 2


@pytest.mark.slow
@pytest.mark.timeout(900)  # four configurations and three fresh-process start-ups, on a shared CPU
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
        timeout=880,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "Machine: cpu" in text and "| configuration | scheduler | batch | s/image |" in text
    # The reference and the two diffusers configurations ran every cell; the others say why they did not.
    import json

    report = json.loads(out.read_text())
    by_name = {c["name"]: c for c in report["configs"]}
    for name in ("diffusers fp16 (plain)", "ours: default", "ours: default + DeepCache 3"):
        cells = by_name[name]["cells"]
        assert len(cells) == 2 and all(c["s_per_image"] > 0 for c in cells)
        assert all(c["pixel_mae"] is not None for c in cells)
    assert "SD_ENDPOINT_COMPILE" not in by_name["ours: default"]["note"]  # CPU: compile auto is off
    assert by_name["ours: default + fp8"]["note"].startswith("could not start: ConfigError")
    assert "fp8 tensor cores" in by_name["ours: default + fp8"]["note"]
    assert by_name["ours: deepspeed"]["note"].startswith("could not start: ModelLoadError")
    assert "no CUDA device" in by_name["ours: deepspeed"]["note"]
    # DeepCache is a request parameter: the default's backend serves its cells, no second build.
    assert by_name["ours: default + DeepCache 3"]["note"].startswith("the default's backend")
    assert [c["name"] for c in report["configs"]][:3] == [
        "diffusers fp16 (plain)",
        "ours: default",
        "ours: default + DeepCache 3",
    ]
    starts = report["startup"]
    # The targets' pair (warm restart against an uncompiled start) runs right after the default configuration
    # filled its compile cache; the first start, which compiles again from nothing, only at the end.
    assert list(starts) == ["warm restart", "uncompiled start", "first start"]
    assert all(v["ready_s"] > 0 for v in starts.values()), starts
