"""Batch image-to-image and inpainting: ``image`` / ``mask_image`` columns holding file names relative to the
input file (as Azure's image batch samples do) or base64."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sd_endpoint.batch import BatchRunner, input_files, read_input
from sd_endpoint.errors import ConfigError
from sd_endpoint.jobs import BatchResult, GenerationSpec, ImageTask
from sd_endpoint.service import GenerationService

SMALL = {"num_inference_steps": 3, "height": 64, "width": 64, "strength": 0.9}


def picture(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def mask(size: tuple[int, int] = (96, 80)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, (20, 20, 60, 60))
    return m


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    (root / "pictures").mkdir(parents=True)
    (root / "pictures" / "fox.png").write_bytes(png(picture(1)))
    (root / "pictures" / "lake.jpg").write_bytes(png(picture(2)))  # a PNG named .jpg: the content decides
    (root / "mask.png").write_bytes(png(mask()))
    (root / "notes.png").write_bytes(b"not an image")
    (tmp_path / "outside.png").write_bytes(png(picture(3)))
    return root


def statuses(rows: Sequence[Any]) -> list[tuple[int | None, str, str]]:
    return [(r.line, r.status, r.error) for r in rows]


def test_image_columns_name_files_relative_to_the_input_file_or_hold_base64(
    service: GenerationService, folder: Path, tmp_path: Path
) -> None:
    b64 = base64.b64encode(png(picture(1))).decode()
    (folder / "i2i.csv").write_text(
        "prompt,image,seed\n"
        "a fox,pictures/fox.png,5\n"  # line 2
        f"a fox,{b64},5\n"  # line 3: the same picture inline
        "a lake,pictures/lake.jpg,6\n"  # line 4
        "plain text row,,7\n",  # line 5: text-to-image in the same file
        encoding="utf-8",
    )
    (folder / "inpaint.jsonl").write_text(
        json.dumps({"prompt": "a boat", "image": "pictures/lake.jpg", "mask_image": "mask.png", "seed": 8}) + "\n",
        encoding="utf-8",
    )
    specs: list[GenerationSpec] = []
    original = service.backend.generate

    def spy(spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: Any = None, on_step: Any = None) -> BatchResult:
        specs.append(spec)
        result: BatchResult = original(spec, tasks, cancel, on_step)
        return result

    service.backend.generate = spy  # type: ignore[method-assign]
    try:
        files = input_files(folder)
        assert [p.name for p in files] == ["i2i.csv", "inpaint.jsonl"]  # the pictures are assets, not inputs
        out = tmp_path / "out"
        rows, summary = BatchRunner(service, out, SMALL).run_files(files)
    finally:
        del service.backend.generate  # type: ignore[method-assign]
    assert statuses(rows) == [(2, "ok", ""), (3, "ok", ""), (4, "ok", ""), (5, "ok", ""), (1, "ok", "")]
    assert summary.generated == 5
    # Consecutive rows of one task share a call; the text row and the inpainting row get their own.
    assert [(s.task, s.strength) for s in specs] == [
        ("image-to-image", 0.9),
        ("text-to-image", 1.0),
        ("inpainting", 0.9),
    ]
    images = {r.line if r.input_file == "i2i.csv" else "inpaint": out / r.generated_image for r in rows}
    by_file, inline = (np.asarray(Image.open(images[n])) for n in (2, 3))
    assert by_file.shape == (64, 64, 3) and np.array_equal(by_file, inline)
    assert not np.array_equal(by_file, np.asarray(Image.open(images[4])))

    # The same row online gives the same image.
    online = service.handle(
        {
            "input_data": {
                "columns": ["prompt", "image", "mask_image"],
                "data": [
                    ["a boat", base64.b64encode(png(picture(2))).decode(), base64.b64encode(png(mask())).decode()]
                ],
            },
            "parameters": {**SMALL, "seed": 8},
        }
    )
    record = online.records[0]
    online_px = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["generated_image"]))))
    assert np.array_equal(online_px, np.asarray(Image.open(images["inpaint"])))


def test_bad_image_rows_are_reported_with_their_line(service: GenerationService, folder: Path, tmp_path: Path) -> None:
    (folder / "bad.csv").write_text(
        "prompt,image,mask_image\n"
        "missing,pictures/none.png,\n"  # 2
        "escape,../outside.png,\n"  # 3
        "not an image,notes.png,\n"  # 4
        "not base64,@@@@,\n"  # 5
        "mask alone,,mask.png\n"  # 6
        "ok,pictures/fox.png,\n",  # 7
        encoding="utf-8",
    )
    rows, summary = BatchRunner(service, tmp_path / "out", SMALL).run_files([folder / "bad.csv"])
    got = {r.line: (r.status, r.error) for r in rows}
    assert got[2] == (
        "error",
        "image: no file 'pictures/none.png' in the input file's folder (image file names are relative to it).",
    )
    assert got[3][1].startswith("image: '../outside.png' is outside the input file's folder")
    assert got[4][1].startswith("image: is not a PNG, JPEG or WebP image")
    assert got[5][1].startswith("image: is not valid base64")
    assert got[6][1].startswith("mask_image: given without an image")
    assert got[7] == ("ok", "")
    assert summary.errors == 5 and summary.generated == 1


def test_image_files_in_a_mini_batch_are_assets_not_bad_input(folder: Path) -> None:
    # Azure hands run() every file of the input folder, the pictures included.
    assert read_input(folder / "pictures" / "fox.png") == ([], [])
    assert read_input(folder / "notes.png") == ([], [])
    (folder / "notes.gif").write_bytes(b"GIF89a")
    assert "unsupported file type '.gif'" in read_input(folder / "notes.gif")[1][0].message


def test_strength_in_batch_parameters(service: GenerationService, tmp_path: Path) -> None:
    BatchRunner(service, tmp_path / "out", {"strength": 0.5})  # accepted: probed with an image row
    with pytest.raises(ConfigError) as info:
        BatchRunner(service, tmp_path / "out", {"strength": 1.5})
    assert "SD_ENDPOINT_BATCH_PARAMETERS" in str(info.value) and "strength" in str(info.value)
