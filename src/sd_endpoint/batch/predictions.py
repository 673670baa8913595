"""Prediction rows and the two files they go to.

``predictions.csv`` has exactly the five fields Azure's own text-to-image batch scoring writes, with no
header, so Azure's sample code (``pd.read_csv(path, header=None, names=[...five names...])``) reads it
unchanged: the 0-based row number within the input file, the prompt, the image file name (next to
predictions.csv), the nsfw flag, the input file name. ``predictions_details.csv`` next to it has a header
and every field: those five, then the input ``line``, the ``seed``, the ``status`` (ok, exists, blocked,
error) and the ``error`` text. Both are written whole through a temporary file and a rename (the local
command), or appended once per finished mini-batch under a lock (Azure: its driver appends predictions.csv
from ``run()``'s return, and ``predictions_details.csv`` gets the same rows at the same point).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PREDICTION_COLUMNS = ("row", "prompt", "generated_image", "nsfw_content_detected", "input_file")
DETAIL_COLUMNS = (*PREDICTION_COLUMNS, "line", "seed", "status", "error")
PREDICTIONS_FILE = "predictions.csv"
DETAILS_FILE = "predictions_details.csv"

Status = Literal["ok", "exists", "blocked", "error"]


@dataclass(frozen=True)
class Prediction:
    row: int | None  # 0-based row within the input file; None: the whole file
    line: int | None  # 1-based line where the row starts; None: the whole file
    prompt: str
    generated_image: str
    nsfw_content_detected: bool | None
    input_file: str
    seed: int | None
    status: Status
    error: str = ""

    def as_list(self) -> list[Any]:
        """The five fields of a predictions.csv line."""
        return [
            _cell(self.row),
            self.prompt,
            self.generated_image,
            _cell(self.nsfw_content_detected),
            self.input_file,
        ]

    def details(self) -> list[Any]:
        """Every field, in DETAIL_COLUMNS order."""
        return [*self.as_list(), _cell(self.line), _cell(self.seed), self.status, self.error]

    def as_csv_line(self) -> str:
        return csv_line(self.as_list())


def _cell(value: Any) -> Any:
    return "" if value is None else value


def csv_line(values: Iterable[Any]) -> str:
    """One CSV record without its line terminator; a field holding a newline is quoted."""
    buf = io.StringIO()
    # The writer quotes a field only if it holds a character of its lineterminator: "" would leave "\n" bare.
    csv.writer(buf, lineterminator="\r\n").writerow(values)
    return buf.getvalue()[:-2]


def write_predictions(folder: Path, rows: Iterable[Prediction]) -> Path:
    """Write both files whole (replacing earlier ones); returns the predictions.csv path."""
    rows = list(rows)
    write_atomic(folder / PREDICTIONS_FILE, "".join(csv_line(r.as_list()) + "\n" for r in rows).encode())
    details = csv_line(DETAIL_COLUMNS) + "\n" + "".join(csv_line(r.details()) + "\n" for r in rows)
    write_atomic(folder / DETAILS_FILE, details.encode())
    return folder / PREDICTIONS_FILE


def append_details(folder: Path, rows: Iterable[Prediction]) -> None:
    """Append one mini-batch's rows to predictions_details.csv, with the header if the file is new.

    Several batch processes share the output folder: one ``write`` under an exclusive lock keeps their
    rows whole and the header single.
    """
    import fcntl

    text = "".join(csv_line(r.details()) + "\n" for r in rows)
    fd = os.open(folder / DETAILS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            text = csv_line(DETAIL_COLUMNS) + "\n" + text
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)  # releases the lock


def read_predictions(path: Path) -> list[dict[str, str]]:
    """Rows of a predictions.csv (no header, as Azure writes it) as dicts keyed by PREDICTION_COLUMNS."""
    with path.open(newline="", encoding="utf-8") as fh:
        return [dict(zip(PREDICTION_COLUMNS, rec, strict=True)) for rec in csv.reader(fh) if rec]


def read_details(path: Path) -> list[dict[str, str]]:
    """Rows of a predictions_details.csv (header row first) as dicts keyed by DETAIL_COLUMNS."""
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_atomic(path: Path, data: bytes) -> None:
    """Through a temporary name and a rename: a crash mid-write leaves the previous file (or none), never half of
    a new one that a rerun would take for finished (an image) or read as complete (a predictions file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
