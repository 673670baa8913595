"""Reading batch input files: one prompt per row, every problem reported with its file and line, never raised.

* ``.csv`` with a header naming ``prompt`` and optionally ``negative_prompt``, ``seed``, ``image`` and
  ``mask_image``; a leading unnamed column (the index ``DataFrame.to_csv`` writes) is ignored;
* ``.jsonl`` / ``.ndjson``: one JSON object per line (``{"prompt": ..., "negative_prompt": ..., "seed": ...}``)
  or one JSON string;
* ``.txt``: one prompt per line.

``image`` / ``mask_image`` (image-to-image, inpainting) hold a file name relative to the input file's folder, as
Azure's image batch samples do, or the image itself in base64. Image files in an input folder are assets of
such rows, not input files, so a folder listing skips them.

Blank lines are skipped. Each row carries two positions: ``row``, its 0-based number among the file's rows
(what Azure's ``predictions.csv`` calls ``row_number_per_file``), and ``line``, the 1-based physical line
where it starts (what an editor shows; a CSV header is line 1, a quoted prompt may span lines).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_endpoint.errors import ConfigError

INPUT_COLUMNS = ("prompt", "negative_prompt", "seed", "image", "mask_image")
IMAGE_FILE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
IMAGE_SUFFIX = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_DERIVED_SEED_BITS = 31


@dataclass(frozen=True)
class InputRow:
    """One prompt read from a file; ``line`` is 1-based and counts the CSV header, ``row`` is 0-based."""

    file: str
    line: int
    prompt: Any
    negative_prompt: Any = None
    seed: Any = None
    extra: tuple[str, ...] = ()
    row: int = 0
    image: Any = None  # a file name relative to the input file's folder, or base64
    mask_image: Any = None


@dataclass(frozen=True)
class BadInput:
    file: str
    line: int | None  # None: the whole file
    message: str
    row: int | None = None

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


def read_input(path: Path) -> tuple[list[InputRow], list[BadInput]]:
    """Rows and problems of one input file; never raises for the file's content."""
    name = path.name
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None and path.suffix.lower() in IMAGE_FILE_SUFFIXES:
        return [], []  # an input image of some row (Azure lists every file of the input folder)
    if kind is None:
        allowed = ", ".join(sorted(SUFFIXES))
        return [], [BadInput(name, None, f"unsupported file type {path.suffix or '(none)'!r}; expected {allowed}")]
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], [BadInput(name, None, f"not UTF-8 text ({exc})")]
    except OSError as exc:
        return [], [BadInput(name, None, f"cannot read the file ({exc.strerror or exc})")]
    if kind == "csv":
        return _read_csv(name, text)
    if kind == "jsonl":
        return _read_jsonl(name, text)
    return _read_txt(name, text), []


def _read_txt(name: str, text: str) -> list[InputRow]:
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return [InputRow(name, n, line, row=i) for i, (n, line) in enumerate(lines)]


def _read_jsonl(name: str, text: str) -> tuple[list[InputRow], list[BadInput]]:
    rows: list[InputRow] = []
    bad: list[BadInput] = []
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for i, (n, line) in enumerate(lines):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(BadInput(name, n, f"not valid JSON ({exc.msg} at column {exc.colno})", i))
            continue
        if isinstance(value, str):
            rows.append(InputRow(name, n, value, row=i))
        elif isinstance(value, dict):
            unknown = tuple(k for k in value if k not in INPUT_COLUMNS)
            rows.append(
                InputRow(
                    name,
                    n,
                    value.get("prompt"),
                    value.get("negative_prompt"),
                    value.get("seed"),
                    unknown,
                    i,
                    value.get("image"),
                    value.get("mask_image"),
                )
            )
        else:
            bad.append(BadInput(name, n, 'expected a JSON object {"prompt": ...} or a JSON string', i))
    return rows, bad


def _read_csv(name: str, text: str) -> tuple[list[InputRow], list[BadInput]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return [], [BadInput(name, None, "empty file; expected a header line naming a 'prompt' column")]
    except csv.Error as exc:
        return [], [BadInput(name, 1, f"not valid CSV ({exc})")]
    columns = [c.strip() for c in header]
    skip_first = bool(columns) and (columns[0] == "" or columns[0].startswith("Unnamed: "))
    named = columns[1:] if skip_first else columns
    unknown = [c for c in named if c not in INPUT_COLUMNS]
    problems = []
    if "prompt" not in named:
        problems.append("no 'prompt' column")
    if unknown:
        problems.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
    if len(set(named)) != len(named):
        problems.append("a column is named twice")
    if problems:
        allowed = ", ".join(INPUT_COLUMNS)
        message = (
            f"{'; '.join(problems)} in the header {named}; allowed: {allowed} (after an optional unnamed index column)"
        )
        return [], [BadInput(name, 1, message)]
    rows: list[InputRow] = []
    bad: list[BadInput] = []
    last = reader.line_num
    count = 0  # data rows seen so far, good or bad: the next row's 0-based number
    while True:
        start = last + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad.append(BadInput(name, start, f"not valid CSV ({exc})", count))
            break  # the reader cannot resynchronise after a broken quote
        last = reader.line_num
        if not any(field.strip() for field in record):
            continue
        count += 1
        if len(record) != len(columns):
            bad.append(BadInput(name, start, f"has {len(record)} fields but the header has {len(columns)}", count - 1))
            continue
        values = dict(zip(columns[1:] if skip_first else columns, record[1:] if skip_first else record, strict=True))
        rows.append(
            InputRow(
                name,
                start,
                values["prompt"],
                values.get("negative_prompt") or None,
                values.get("seed") or None,
                row=count - 1,
                image=values.get("image") or None,
                mask_image=values.get("mask_image") or None,
            )
        )
    return rows, bad


def csv_seed(value: Any) -> Any:
    """CSV cells are text: '7' and pandas' '7.0' (a column with gaps) are 7; other text stays for the contract."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text


def derived_seed(row: InputRow) -> int:
    """The seed of a row that names none: stable across reruns, different for every file, line and text."""
    key = f"{row.file}\n{row.line}\n{row.prompt}\n{row.negative_prompt or ''}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") & ((1 << _DERIVED_SEED_BITS) - 1)


def image_name(file: str, line: int, seed: int, output_format: str = "png") -> str:
    """A pure function of file, line and seed: a rerun finds the image it would write already there."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", file).strip("_")[:80] or "input"
    return f"{stem}_L{line:06d}_s{seed}.{IMAGE_SUFFIX[output_format]}"


def input_files(source: Path) -> list[Path]:
    """A file, or every non-hidden file under a folder except image files (the rows' inputs), sorted."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ConfigError(f"{source}: no such file or folder.")
    return sorted(
        p
        for p in source.rglob("*")
        if p.is_file()
        and p.suffix.lower() not in IMAGE_FILE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )
