"""batch_score.py, Azure's batch contract: init() once, run(mini_batch) with file paths, lines for predictions.csv.

Called in-process exactly as Azure's driver calls it, with AZUREML_BI_OUTPUT_PATH and AZUREML_MODEL_DIR set,
and through the worker process that the batch image uses (SD_ENDPOINT_BATCH_PYTHON).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from sd_endpoint.batch import DETAILS_FILE, PREDICTION_COLUMNS, read_details

REPO = Path(__file__).resolve().parents[2]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batch_score_under_test", REPO / "batch_score.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def azure_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, cache_dir: Path) -> Iterator[Path]:
    out = tmp_path / "score"
    out.mkdir()
    for name, value in {
        "AZUREML_BI_OUTPUT_PATH": str(out),
        "AZUREML_MODEL_DIR": str(tiny_model_dir.parent),  # found one level down, as Azure mounts it
        "SD_ENDPOINT_DEVICE": "cpu",
        "SD_ENDPOINT_DTYPE": "float32",
        "SD_ENDPOINT_WARMUP": "false",
        "SD_ENDPOINT_CACHE_DIR": str(cache_dir),
        "SD_ENDPOINT_BATCH_PARAMETERS": '{"num_inference_steps": 3, "height": 64, "width": 64}',
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("SD_ENDPOINT_MODEL", "CONTENT_SAFETY_ENDPOINT", "SD_ENDPOINT_BATCH_PYTHON"):
        monkeypatch.delenv(name, raising=False)
    yield out


@pytest.fixture
def mini_batch(tmp_path: Path) -> list[str]:
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "prompts.csv").write_text(
        ",prompt,negative_prompt,seed\n0,an astronaut riding a horse,blurry,1\n1,,,\n2,a red fox,,2\n", encoding="utf-8"
    )
    (folder / "more.jsonl").write_text('{"prompt": "a lighthouse", "seed": 3}\n{"promt": "typo"}\n', encoding="utf-8")
    (folder / "plain.txt").write_text("a mountain lake at dawn\n", encoding="utf-8")
    (folder / "broken.txt").write_bytes(b"\xff\xfe\x00 not text")
    (folder / "subdir.csv").mkdir()  # unreadable as a file
    return [str(folder / n) for n in ("prompts.csv", "more.jsonl", "plain.txt", "broken.txt", "subdir.csv")] + [
        str(folder / "vanished.txt")
    ]


def parse(lines: list[str]) -> list[dict[str, str]]:
    assert all(isinstance(line, str) and "\n" not in line for line in lines)
    return [dict(zip(PREDICTION_COLUMNS, rec, strict=True)) for rec in csv.reader(io.StringIO("\n".join(lines)))]


def details(out: Path, lines: list[str]) -> list[dict[str, str]]:
    """The details of the last mini-batch (its rows are the file's last ones), checked against its five fields."""
    rows = parse(lines)
    got = read_details(out / DETAILS_FILE)[-len(rows) :]
    assert [{k: d[k] for k in PREDICTION_COLUMNS} for d in got] == rows
    return got


def check_rows(rows: list[dict[str, str]], out: Path) -> None:
    assert [(r["input_file"], r["row"]) for r in rows] == [
        ("prompts.csv", "0"),
        ("prompts.csv", "1"),
        ("prompts.csv", "2"),
        ("more.jsonl", "0"),
        ("more.jsonl", "1"),
        ("plain.txt", "0"),
        ("broken.txt", ""),
        ("subdir.csv", ""),
        ("vanished.txt", ""),
    ]
    got = [(r["input_file"], r["line"], r["status"]) for r in rows]
    assert got == [
        ("prompts.csv", "2", "ok"),
        ("prompts.csv", "3", "error"),
        ("prompts.csv", "4", "ok"),
        ("more.jsonl", "1", "ok"),
        ("more.jsonl", "2", "error"),
        ("plain.txt", "1", "ok"),
        ("broken.txt", "", "error"),
        ("subdir.csv", "", "error"),
        ("vanished.txt", "", "error"),
    ]
    errors = {(r["input_file"], r["line"]): r["error"] for r in rows if r["status"] == "error"}
    assert "prompt: must not be empty" in errors[("prompts.csv", "3")]
    assert "unknown key(s) 'promt'" in errors[("more.jsonl", "2")]
    assert "not UTF-8" in errors[("broken.txt", "")]
    assert "cannot read the file" in errors[("subdir.csv", "")]
    assert "cannot read the file" in errors[("vanished.txt", "")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["seed"] for r in ok][:3] == ["1", "2", "3"]
    for r in ok:
        assert r["nsfw_content_detected"] == ""  # null: no screening configured
        with Image.open(out / r["generated_image"]) as im:
            assert (im.format, im.size) == ("PNG", (64, 64))
    assert sorted(p.name for p in out.iterdir() if p.name != DETAILS_FILE) == sorted(r["generated_image"] for r in ok)


@pytest.mark.slow
def test_in_process(azure_env: Path, mini_batch: list[str]) -> None:
    from sd_endpoint.batch import BatchInputError

    script = load_script()
    script.init()
    try:
        rows = details(azure_env, script.run(mini_batch))
        check_rows(rows, azure_env)
        # Azure retries a failed mini-batch: the images are already there and are not generated again.
        again = details(azure_env, script.run(mini_batch))
        assert [r["status"] for r in again if r["generated_image"]] == ["exists"] * 4
        # SD_ENDPOINT_BATCH_FAIL_ON_BAD_INPUT: bad input fails the mini-batch, so error_threshold counts it.
        script._runner.runner.fail_on_bad_input = True
        before = len(read_details(azure_env / DETAILS_FILE))
        with pytest.raises(BatchInputError, match=r"5 bad input row\(s\) or file\(s\)"):
            script.run(mini_batch)
        assert len(list(azure_env.glob("*.png"))) == 4
        assert len(read_details(azure_env / DETAILS_FILE)) == before  # a failed mini-batch appends nothing
    finally:
        script.shutdown()


def test_run_before_init_is_an_error() -> None:
    script = load_script()
    with pytest.raises(RuntimeError, match=r"init\(\) did not run"):
        script.run([])


@pytest.mark.slow
def test_worker_process_gives_the_same_rows(
    azure_env: Path, mini_batch: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_ENDPOINT_BATCH_PYTHON", sys.executable)
    script = load_script()
    script.init()
    try:
        assert type(script._runner).__name__ == "_Worker"
        check_rows(details(azure_env, script.run(mini_batch)), azure_env)
        # A worker that died (e.g. a GPU fault) is started afresh for the next mini-batch.
        script._runner.proc.kill()
        script._runner.proc.wait()
        again = details(azure_env, script.run(mini_batch[:1]))
        assert [r["status"] for r in again] == ["exists", "error", "exists"]
        # A failure inside the worker comes back as an error reply (run() raises it, so Azure retries).
        worker = script._runner
        worker.proc.stdin.write('{"not-files": []}\n')
        worker.proc.stdin.flush()
        assert worker._read(worker.proc) == {"error": "KeyError: 'files'", "kind": "failure"}
        assert worker.proc.poll() is None  # and the worker keeps serving
    finally:
        script.shutdown()


@pytest.mark.slow
def test_worker_start_error_fails_init(azure_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SD_ENDPOINT_BATCH_PYTHON", sys.executable)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "no-such-model"))
    with pytest.raises(RuntimeError, match=r"did not start: ModelLoadError: AZUREML_MODEL_DIR=.*does not exist"):
        load_script().init()


@pytest.mark.slow
def test_azure_notebook_reads_what_azure_appends(azure_env: Path, tmp_path: Path, service: Any) -> None:
    """run()'s lines, appended the way Azure's append_row does, read by the batch notebooks' code."""
    from tests.batch.test_azure_samples import azure_appends, check_azure_reading, write_inputs

    files = [str(p) for p in write_inputs(tmp_path / "azure-inputs")]
    script = load_script()
    script.init()
    try:
        azure_appends(azure_env, script.run(files[:1]))  # two mini-batches
        azure_appends(azure_env, script.run(files[1:]))
    finally:
        script.shutdown()
    check_azure_reading(azure_env, service, {"num_inference_steps": 3, "height": 64, "width": 64})
