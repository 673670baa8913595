"""The batch core (sd_endpoint.batch): reading inputs, images on disk, prediction rows and files, resume, the CLI."""

from __future__ import annotations

import argparse
import base64
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sd_endpoint import batch
from sd_endpoint.batch import BatchInputError, BatchRunner, BatchSettings, gpu_slots, read_input
from sd_endpoint.batch.inputs import csv_seed
from sd_endpoint.errors import ConfigError
from sd_endpoint.safety.base import Verdict
from sd_endpoint.service import GenerationService
from sd_endpoint.settings import load

SMALL = {"num_inference_steps": 3, "height": 64, "width": 64}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Reading


def test_csv_with_pandas_index_column_quotes_and_multiline(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "prompt": ["a red fox", 'a cat, "quoted"', "two\nlines", "last"],
            "negative_prompt": ["blurry", None, None, "dark"],
            "seed": [7, None, 9, None],  # a gap makes pandas write floats: 7.0
        }
    )
    path = tmp_path / "in.csv"
    frame.to_csv(path)  # writes the unnamed index column first
    rows, bad = read_input(path)
    assert bad == []
    assert [r.prompt for r in rows] == ["a red fox", 'a cat, "quoted"', "two\nlines", "last"]
    # Line numbers are physical lines: header is 1, the two-line prompt spans 4-5.
    assert [r.line for r in rows] == [2, 3, 4, 6]
    assert [r.row for r in rows] == [0, 1, 2, 3]  # Azure's row_number_per_file: data rows, 0-based
    assert [r.negative_prompt for r in rows] == ["blurry", None, None, "dark"]
    assert [csv_seed(r.seed) for r in rows] == [7, None, 9, None]


def test_csv_problems_name_file_and_line(tmp_path: Path) -> None:
    rows, bad = read_input(write(tmp_path / "x.csv", 'prompt,seed\n"ok",1\n"too","many",fields\n\n"fine",\n'))
    assert [r.prompt for r in rows] == ["ok", "fine"]
    assert [(r.row, r.line) for r in rows] == [(0, 2), (2, 5)]  # the bad record is row 1; blank lines are no row
    assert [(b.file, b.line, b.row) for b in bad] == [("x.csv", 3, 1)]
    assert "3 fields but the header has 2" in bad[0].message

    for header, expected in [
        ("text,seed", "no 'prompt' column"),
        ("prompt,negative_promt", "unknown column(s) 'negative_promt'"),
        ("prompt,prompt", "named twice"),
    ]:
        rows, bad = read_input(write(tmp_path / "h.csv", f"{header}\na,b\n"))
        assert rows == []
        assert (bad[0].line, expected in bad[0].message) == (1, True), bad[0].message
        assert "allowed: prompt, negative_prompt, seed" in bad[0].message

    rows, bad = read_input(write(tmp_path / "empty.csv", ""))
    assert rows == [] and bad[0].line is None and "empty file" in bad[0].message


def test_jsonl_and_txt(tmp_path: Path) -> None:
    rows, bad = read_input(
        write(
            tmp_path / "p.jsonl",
            '{"prompt": "one", "seed": 3, "negative_prompt": "dull"}\n\n"two"\n{broken\n[1]\n'
            '{"prompt": "x", "size": 1}\n',
        )
    )
    assert [(r.row, r.line, r.prompt, r.seed, r.negative_prompt) for r in rows] == [
        (0, 1, "one", 3, "dull"),
        (1, 3, "two", None, None),
        (4, 6, "x", None, None),
    ]
    assert rows[2].extra == ("size",)
    assert [(b.line, b.message.split(" (")[0]) for b in bad] == [
        (4, "not valid JSON"),
        (5, 'expected a JSON object {"prompt": ...} or a JSON string'),
    ]
    rows, bad = read_input(write(tmp_path / "p.txt", "first prompt\n\n  second prompt  \r\n"))
    assert [(r.row, r.line, r.prompt) for r in rows] == [(0, 1, "first prompt"), (1, 3, "second prompt")]
    assert bad == []


def test_unreadable_files_are_reported_not_raised(tmp_path: Path) -> None:
    for path, expected in [
        (write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1")), "not UTF-8"),
        (write(tmp_path / "data.json", "{}"), "unsupported file type '.json'"),
        (tmp_path / "missing.csv", "cannot read the file"),
    ]:
        rows, bad = read_input(path)
        assert rows == [] and len(bad) == 1 and bad[0].line is None
        assert expected in bad[0].message
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    assert "cannot read the file" in read_input(folder)[1][0].message


def test_image_names_and_derived_seeds_are_deterministic() -> None:
    row = batch.InputRow("my prompts.csv", 12, "a cat")
    assert batch.derived_seed(row) == batch.derived_seed(batch.InputRow("my prompts.csv", 12, "a cat"))
    assert batch.derived_seed(row) != batch.derived_seed(batch.InputRow("my prompts.csv", 13, "a cat"))
    assert 0 <= batch.derived_seed(row) < 2**31
    assert batch.image_name("my prompts.csv", 12, 99) == "my_prompts_csv_L000012_s99.png"
    assert batch.image_name("a.txt", 1, 5, "jpeg").endswith(".jpg")


# ------------------------------------------------------------------------------------------------
# Running


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "in"
    return [
        write(
            folder / "a.csv",
            ',prompt,negative_prompt,seed\n0,a red fox,blurry,7\n1,"",,\n2,a blue bird,,oops\n3,a cat,,\n',
        ),
        write(folder / "b.jsonl", '{"prompt": "a lighthouse", "seed": 11}\n{"prompt": 5}\n'),
        write(folder / "c.txt", "a mountain lake\n"),
        write(folder / "d.csv", b"\xff\xfeprompt\n"),
    ]


def statuses(rows: Sequence[batch.Prediction]) -> list[tuple[str, int | None, str]]:
    return [(r.input_file, r.line, r.status) for r in rows]


def decode_png(path: Path) -> Image.Image:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data))


def test_runner_writes_images_and_reports_every_row(
    service: GenerationService, inputs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rows, summary = BatchRunner(service, out, SMALL).run_files(inputs)
    assert statuses(rows) == [
        ("a.csv", 2, "ok"),
        ("a.csv", 3, "error"),
        ("a.csv", 4, "error"),
        ("a.csv", 5, "ok"),
        ("b.jsonl", 1, "ok"),
        ("b.jsonl", 2, "error"),
        ("c.txt", 1, "ok"),
        ("d.csv", None, "error"),
    ]
    assert [r.row for r in rows] == [0, 1, 2, 3, 0, 1, 0, None]
    by_key = {(r.input_file, r.line): r for r in rows}
    assert "prompt: must not be empty" in by_key[("a.csv", 3)].error
    assert "seed: must be a whole number" in by_key[("a.csv", 4)].error and "'oops'" in by_key[("a.csv", 4)].error
    assert "prompt" in by_key[("b.jsonl", 2)].error
    assert "not UTF-8" in by_key[("d.csv", None)].error
    ok = [r for r in rows if r.status == "ok"]
    assert by_key[("a.csv", 2)].seed == 7 and by_key[("b.jsonl", 1)].seed == 11
    assert by_key[("c.txt", 1)].seed == batch.derived_seed(batch.InputRow("c.txt", 1, "a mountain lake"))
    for r in ok:
        assert r.generated_image == batch.image_name(r.input_file, r.line or 0, r.seed or 0)
        assert decode_png(out / r.generated_image).size == (64, 64)
        assert r.nsfw_content_detected is None  # no screening configured
    assert sorted(p.name for p in out.iterdir()) == sorted(r.generated_image for r in ok)
    assert (summary.files, summary.rows, summary.generated, summary.errors) == (4, 8, 4, 4)
    assert summary.problems[0].startswith("a.csv:3: ")


def test_batch_image_equals_the_online_image(service: GenerationService, tmp_path: Path) -> None:
    src = write(tmp_path / "one.jsonl", '{"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7}\n')
    rows, _ = BatchRunner(service, tmp_path / "out", SMALL).run_files([src])
    online = service.handle(
        {
            "input_data": {
                "columns": ["prompt", "negative_prompt"],
                "data": [{"prompt": "a red fox", "negative_prompt": "blurry"}],
            },
            "parameters": {**SMALL, "seed": 7},
        }
    )
    assert (tmp_path / "out" / rows[0].generated_image).read_bytes() == base64.b64decode(
        online.records[0]["generated_image"]
    )


def test_resume_skips_written_images_and_redoes_missing_ones(
    service: GenerationService, inputs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first, _ = BatchRunner(service, out, SMALL).run_files(inputs)
    images = {r.generated_image: (out / r.generated_image).read_bytes() for r in first if r.status == "ok"}

    calls: list[int] = []
    original = service.backend.generate

    def counting(spec: Any, tasks: Sequence[Any], cancel: Any = None, on_step: Any = None) -> Any:
        calls.append(len(tasks))
        return original(spec, tasks, cancel, on_step)

    monkeypatch.setattr(service.backend, "generate", counting)
    again, summary = BatchRunner(service, out, SMALL).run_files(inputs)
    assert calls == []
    assert [r.status for r in again if r.generated_image] == ["exists"] * len(images)
    assert summary.existing == len(images) and summary.generated == 0

    gone = sorted(images)[0]
    (out / gone).unlink()
    (out / sorted(images)[1]).write_bytes(b"")  # an empty file (a crash mid-write elsewhere) is not done
    third, summary = BatchRunner(service, out, SMALL).run_files(inputs)
    assert sum(calls) == 2 and summary.generated == 2 and summary.existing == len(images) - 2
    for name, data in images.items():
        assert (out / name).read_bytes() == data  # the same seed gives the same image


def test_parameters_seed_applies_to_rows_without_one(service: GenerationService, tmp_path: Path) -> None:
    src = write(tmp_path / "s.txt", "one\ntwo\n")
    rows, _ = BatchRunner(service, tmp_path / "out", {**SMALL, "seed": 42, "num_images_per_prompt": 2}).run_files([src])
    assert [(r.line, r.seed) for r in rows] == [(1, 42), (1, 43), (2, 42), (2, 43)]
    assert len({r.generated_image for r in rows}) == 4


class BlockingScreener:
    """Blocks prompts containing 'forbidden' and every image whose prompt contained 'gory'."""

    enabled = True

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
        self.prompts = [p for p, _ in prompts]
        return [
            Verdict(
                "prompt",
                "forbidden" in p,
                {"Violence": 6 if "forbidden" in p else 0},
                {"Violence": 6} if "forbidden" in p else {},
            )
            for p, _ in prompts
        ]

    def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
        allowed = [p for p in self.prompts if "forbidden" not in p]
        return [Verdict("image", "gory" in p, {}, {"Sexual": 4} if "gory" in p else {}) for p in allowed]

    def close(self) -> None:
        pass


def test_blocked_rows_are_recorded_and_not_written(settings: Any, backend: Any, tmp_path: Path) -> None:
    svc = GenerationService(settings, backend, BlockingScreener())  # type: ignore[arg-type]
    src = write(tmp_path / "p.txt", "a calm sea\na forbidden thing\na gory scene\n")
    out = tmp_path / "out"
    rows, summary = BatchRunner(svc, out, SMALL).run_files([src])
    assert [(r.line, r.status, r.nsfw_content_detected) for r in rows] == [
        (1, "ok", False),
        (2, "blocked", True),
        (3, "blocked", True),
    ]
    assert rows[1].error == "blocked at the prompt stage (Violence=6)"
    assert rows[2].error == "blocked at the image stage (Sexual=4)"
    assert rows[1].generated_image == rows[2].generated_image == ""
    assert [p.name for p in out.iterdir()] == [rows[0].generated_image]
    assert summary.blocked == 2


def test_fail_on_bad_input_raises_after_the_good_rows(
    service: GenerationService, inputs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(BatchInputError, match=r"4 bad input row\(s\).*a\.csv:3: "):
        BatchRunner(service, out, SMALL, fail_on_bad_input=True).run_files(inputs)
    assert len(list(out.glob("*.png"))) == 4  # written before failing: a retry resumes them


def test_bad_parameters_fail_at_start(service: GenerationService, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"SD_ENDPOINT_BATCH_PARAMETERS.*guidence_scale"):
        BatchRunner(service, tmp_path, {"guidence_scale": 3})


def test_batch_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SD_ENDPOINT_BATCH_PARAMETERS", '{"num_inference_steps": 30}')
    monkeypatch.setenv("AZUREML_BI_OUTPUT_PATH", str(tmp_path))
    monkeypatch.setenv("SD_ENDPOINT_BATCH_FAIL_ON_BAD_INPUT", "true")
    got = load(BatchSettings)
    assert (got.parameters, got.output_path, got.fail_on_bad_input) == ({"num_inference_steps": 30}, tmp_path, True)
    for bad in ("{not json", "[1, 2]"):
        monkeypatch.setenv("SD_ENDPOINT_BATCH_PARAMETERS", bad)
        with pytest.raises(ConfigError, match="SD_ENDPOINT_BATCH_PARAMETERS"):
            load(BatchSettings)


PREDICTION_ROWS = [
    batch.Prediction(0, 2, 'a "quoted", prompt\nwith a newline', "a_csv_L000002_s7.png", None, "a.csv", 7, "ok"),
    batch.Prediction(None, None, "", "", None, "bad.txt", None, "error", "not UTF-8 text"),
    batch.Prediction(2, 4, "x", "", True, "a.csv", 1, "blocked", "blocked at the prompt stage"),
]


def test_predictions_round_trip(tmp_path: Path) -> None:
    rows = PREDICTION_ROWS
    path = batch.write_predictions(tmp_path, rows)
    assert path == tmp_path / "predictions.csv"
    back = batch.read_predictions(path)
    assert back[0]["prompt"] == 'a "quoted", prompt\nwith a newline'
    assert (back[0]["row"], back[0]["generated_image"]) == ("0", "a_csv_L000002_s7.png")
    assert (back[1]["row"], back[1]["input_file"], back[1]["generated_image"]) == ("", "bad.txt", "")
    assert back[2]["nsfw_content_detected"] == "True"
    assert path.read_bytes().decode().startswith(rows[0].as_csv_line() + "\n")
    assert rows[0].as_csv_line().endswith(",a.csv")  # exactly five fields: nothing after the input file

    details = batch.read_details(tmp_path / "predictions_details.csv")
    assert (tmp_path / "predictions_details.csv").read_text().splitlines()[0] == ",".join(batch.DETAIL_COLUMNS)
    assert details[0]["seed"] == "7" and details[0]["line"] == "2" and details[0]["prompt"] == back[0]["prompt"]
    assert (details[1]["line"], details[1]["status"], details[1]["error"]) == ("", "error", "not UTF-8 text")
    assert [d["status"] for d in details] == ["ok", "error", "blocked"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv", "predictions_details.csv"]  # no tmp


def test_details_appended_per_mini_batch_with_one_header(tmp_path: Path) -> None:
    from sd_endpoint.batch.predictions import append_details

    append_details(tmp_path, PREDICTION_ROWS[:2])
    append_details(tmp_path, PREDICTION_ROWS[2:])
    lines = (tmp_path / "predictions_details.csv").read_text().splitlines()
    assert lines.count(",".join(batch.DETAIL_COLUMNS)) == 1 and lines[0] == ",".join(batch.DETAIL_COLUMNS)
    assert [d["status"] for d in batch.read_details(tmp_path / "predictions_details.csv")] == [
        "ok",
        "error",
        "blocked",
    ]


def test_gpu_slots_are_exclusive_per_process(tmp_path: Path) -> None:
    held = len(gpu_slots._held_locks)
    try:
        assert gpu_slots.claim_gpu_slot(2, tmp_path) == 0
        assert gpu_slots.claim_gpu_slot(2, tmp_path) == 1  # a second claimant gets the other GPU
        assert gpu_slots.claim_gpu_slot(2, tmp_path) in (0, 1)  # more claimants than GPUs: shared
    finally:
        for fh in gpu_slots._held_locks[held:]:
            fh.close()
        del gpu_slots._held_locks[held:]


# ------------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def cli(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[argparse.ArgumentParser]:
    monkeypatch.setenv("SD_ENDPOINT_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("CONTENT_SAFETY_ENDPOINT", raising=False)
    parser = argparse.ArgumentParser()
    batch.register_cli(parser.add_subparsers(dest="command", required=True))
    yield parser


@pytest.mark.slow
def test_cli_runs_a_folder_and_resumes(
    cli: argparse.ArgumentParser,
    inputs: list[Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = [
        "batch",
        str(inputs[0].parent),
        str(out),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--parameters",
        '{"num_inference_steps": 3, "height": 64, "width": 64}',
    ]
    args = cli.parse_args(argv)
    assert args.func(args) == 1  # some rows were bad
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "predictions.csv")
    assert "error: a.csv:3: prompt: must not be empty" in captured.err
    assert "4 file(s), 8 row(s): 4 generated, 0 already present, 0 blocked, 4 error(s)" in captured.err
    written = batch.read_details(out / "predictions_details.csv")
    assert [(r["input_file"], r["status"]) for r in written][:2] == [("a.csv", "ok"), ("a.csv", "error")]
    five = batch.read_predictions(out / "predictions.csv")
    assert [(r["input_file"], r["row"], r["generated_image"]) for r in five] == [
        (r["input_file"], r["row"], r["generated_image"]) for r in written
    ]

    args = cli.parse_args([*argv, "--quiet"])
    assert args.func(args) == 1
    assert "0 generated, 4 already present" in capsys.readouterr().err
    assert [r["status"] for r in batch.read_details(out / "predictions_details.csv")].count("exists") == 4


@pytest.mark.slow
def test_cli_exit_zero_when_all_rows_are_good(
    cli: argparse.ArgumentParser, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write(tmp_path / "in" / "p.txt", "one\n")
    params = tmp_path / "params.json"
    params.write_text('{"num_inference_steps": 2, "height": 64, "width": 64}')
    args = cli.parse_args(
        [
            "batch",
            str(src),
            str(tmp_path / "out"),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--parameters",
            f"@{params}",
            "-q",
        ]
    )
    assert args.func(args) == 0
    assert "1 generated" in capsys.readouterr().err
