"""The sd-endpoint command line: generate, invoke (in-process and over HTTP), demo-model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sd_endpoint.cli import main


def test_generate_writes_an_image(
    tiny_model_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SD_ENDPOINT_CACHE_DIR", str(cache_dir))
    out = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            "a red fox",
            "-o",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "96",
            "--seed",
            "7",
        ]
    )
    assert code == 0
    assert Image.open(out).size == (96, 64)
    assert "seed=7" in capsys.readouterr().out


def test_generate_reports_bad_parameters(
    tiny_model_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SD_ENDPOINT_CACHE_DIR", str(cache_dir))
    code = main(["generate", "x", "--model", str(tiny_model_dir), "--device", "cpu", "--height", "100"])
    assert code == 1
    assert "height: must be a multiple of 8" in capsys.readouterr().err


def test_bad_model_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2


def test_invoke_in_process_names_files_by_prompt_and_seed(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_ENDPOINT_CACHE_DIR", str(cache_dir))
    request = tmp_path / "sample-request.json"
    request.write_text(
        json.dumps(
            {
                "input_data": {
                    "columns": ["prompt"],
                    "data": ["a cat on a mat", "a dog"],
                    "index": [0, 1],
                    "parameters": {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 3},
                }
            }
        )
    )
    out = tmp_path / "images"
    assert (
        main(
            [
                "invoke",
                "--request-file",
                str(request),
                "--out-dir",
                str(out),
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00_a_cat_on_a_mat_seed3.png", "01_a_dog_seed3.png"]


class JumpingClock:
    """``time`` for sd_endpoint.jobs whose monotonic clock moves 60 s per reading: any deadline passes at once."""

    def __init__(self) -> None:
        self.readings = 0

    def monotonic(self) -> float:
        self.readings += 1
        return time.monotonic() + 60.0 * self.readings


def test_local_commands_have_no_deadline_unless_asked(
    tiny_model_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sd_endpoint import jobs

    monkeypatch.setenv("SD_ENDPOINT_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("SD_ENDPOINT_REQUEST_TIMEOUT_MS", "100")  # the online deadline: tiny
    clock = JumpingClock()
    monkeypatch.setattr(jobs, "time", clock)
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    gen = ["generate", "a red fox", "-o", str(tmp_path / "fox.png"), "--steps", "3", "--height", "64", "--width", "64"]
    assert main([*gen, *model]) == 0  # minutes pass on the clock: no deadline
    assert Image.open(tmp_path / "fox.png").size == (64, 64)
    capsys.readouterr()
    assert main([*gen, *model, "--timeout", "30"]) == 1  # asked for one: it applies
    assert "error (408): Generation stopped" in capsys.readouterr().err

    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {"input_data": {"data": ["a dog"]}, "parameters": {"num_inference_steps": 3, "height": 64, "width": 64}}
        )
    )
    inv = ["invoke", "--request-file", str(request), "--out-dir", str(tmp_path / "inv"), *model]
    assert main(inv) == 0
    assert len(list((tmp_path / "inv").glob("*.png"))) == 1
    assert main([*inv, "--timeout", "30"]) == 1
    assert "error (408)" in capsys.readouterr().err


def test_demo_model_command_writes_a_loadable_model(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd_endpoint.model.checks import check_diffusers_folder

    monkeypatch.setenv("SD_ENDPOINT_CACHE_DIR", str(cache_dir))
    assert main(["demo-model", str(tmp_path / "demo")]) == 0
    index = check_diffusers_folder(tmp_path / "demo")
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert (tmp_path / "demo" / "tokenizer" / "vocab.json").is_file()


def test_console_script_help_lists_every_command() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "sd-endpoint"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for command in ("generate", "invoke", "demo-model"):
        assert command in out
