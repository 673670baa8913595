"""Our batch output read by the code of Azure's text-to-image batch samples, unchanged.

Azure's batch notebooks download the job's ``score`` output and read ``predictions.csv`` with
``pd.read_csv(path, header=None, names=<five names>)``; each row's ``generated_image`` is a file name in the
same folder. Any extra field would make pandas shift the columns silently, so this test reads our output
exactly that way and checks every row's prompt and image against the inputs.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from typing import Any

from PIL import Image

from sd_endpoint.batch import DETAILS_FILE, BatchRunner, read_details, write_predictions
from sd_endpoint.service import GenerationService

AZURE_NAMES = ["row_number_per_file", "prompt", "generated_image", "nsfw_content_detected", "input_csv_name"]
SMALL = {"num_inference_steps": 2, "height": 64, "width": 64}

# Prompts that break naive CSV handling: commas, quotes, a newline, a number-like text, non-ASCII.
INPUTS = {
    "first.csv": ',prompt,seed\n0,"a fox, red",5\n1,"a ""quoted"" cat",6\n2,"two\nlines",\n3,1234,\n',
    "second.jsonl": '{"prompt": "café at night"}\n\n{"prompt": ""}\n"a lighthouse"\n',
    "third.txt": "a mountain lake\n",
}
# (input file, 0-based row) -> prompt, written out independently of our reader.
EXPECTED = {
    ("first.csv", 0): "a fox, red",
    ("first.csv", 1): 'a "quoted" cat',
    ("first.csv", 2): "two\nlines",
    ("first.csv", 3): "1234",
    ("second.jsonl", 0): "café at night",
    ("second.jsonl", 1): "",  # an empty prompt: an error row, no image
    ("second.jsonl", 2): "a lighthouse",
    ("third.txt", 0): "a mountain lake",
}


def write_inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in INPUTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return [folder / name for name in INPUTS]


def read_like_azure(folder: Path) -> Any:
    """What Azure's batch notebooks do with the downloaded output folder."""
    import pandas as pd

    return pd.read_csv(folder / "predictions.csv", header=None, names=AZURE_NAMES)


def pixels(data: bytes) -> Any:
    import numpy as np

    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size) == ("PNG", (64, 64))
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def check_azure_reading(folder: Path, service: GenerationService, parameters: dict[str, Any]) -> None:
    score_df = read_like_azure(folder)
    assert list(score_df.columns) == AZURE_NAMES
    assert len(score_df) == len(EXPECTED)
    seeds = {(d["input_file"], int(d["row"])): int(d["seed"] or 0) for d in read_details(folder / DETAILS_FILE)}
    # What the online path gives for each row's prompt and seed; a row's image must be closest to its own
    # (rows generated together in one batch differ from a lone request in the last bits, not in content).
    reference = {
        key: pixels(
            base64.b64decode(
                service.handle(
                    {"input_data": {"data": [prompt]}, "parameters": {**parameters, "seed": seeds[key]}}
                ).records[0]["generated_image"]
            )
        )
        for key, prompt in EXPECTED.items()
        if prompt
    }
    seen = set()
    for record in score_df.to_dict("records"):
        key = (record["input_csv_name"], int(record["row_number_per_file"]))
        seen.add(key)
        prompt = record["prompt"]
        # pandas reads an empty field as NaN and a number-like one as a number: compare as the notebook would.
        assert ("" if prompt != prompt else str(prompt)) == EXPECTED[key], key
        image = record["generated_image"]
        if EXPECTED[key] == "":
            assert image != image  # NaN: no image for the error row
            continue
        got = pixels((folder / image).read_bytes())
        distance = {other: float(abs(got - ref).mean()) for other, ref in reference.items()}
        assert min(distance, key=lambda k: distance[k]) == key and distance[key] < 2.0, (key, distance)
    assert seen == set(EXPECTED)


def test_azure_notebook_reads_the_local_batch_output(service: GenerationService, tmp_path: Path) -> None:
    files = write_inputs(tmp_path / "in")
    out = tmp_path / "named-outputs" / "score"
    rows, _ = BatchRunner(service, out, SMALL).run_files(files)
    write_predictions(out, rows)
    check_azure_reading(out, service, SMALL)
    # Every line has exactly five fields, whatever the prompt holds.
    with (out / "predictions.csv").open(newline="", encoding="utf-8") as fh:
        assert {len(rec) for rec in csv.reader(fh)} == {5}


def azure_appends(folder: Path, lines: list[str]) -> None:
    """Azure's append_row: the lines run() returned, appended to predictions.csv."""
    with (folder / "predictions.csv").open("a", encoding="utf-8", newline="") as fh:
        fh.write("".join(line + "\n" for line in lines))


def test_check_catches_a_sixth_field(service: GenerationService, tmp_path: Path) -> None:
    """The reading check is not vacuous: one extra field per line shifts pandas' columns and fails it."""
    import pytest

    files = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    rows, _ = BatchRunner(service, out, SMALL).run_files(files)
    write_predictions(out, rows)
    text = (out / "predictions.csv").read_text(encoding="utf-8")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for rec, row in zip(csv.reader(io.StringIO(text, newline="")), rows, strict=True):
        writer.writerow([*rec, row.seed])
    (out / "predictions.csv").write_text(buf.getvalue(), encoding="utf-8")
    with pytest.raises((AssertionError, KeyError, ValueError, TypeError)):
        check_azure_reading(out, service, SMALL)
