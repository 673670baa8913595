"""Batch generation: the core shared by ``batch_score.py`` (Azure ML batch endpoints) and ``sd-endpoint batch``.

Input files, one prompt per row:

* ``.csv`` with a header naming ``prompt`` and optionally ``negative_prompt`` and ``seed``; a leading unnamed
  column (the index ``DataFrame.to_csv`` writes) is ignored;
* ``.jsonl`` / ``.ndjson``: one JSON object per line (``{"prompt": ..., "negative_prompt": ..., "seed": ...}``)
  or one JSON string;
* ``.txt``: one prompt per line.

Blank lines are skipped. Each image is written to the output folder as ``<file>_L<line>_s<seed>.<ext>``; that
name is a pure function of the input file, the line and the seed, so a rerun (or an Azure retry of a mini-batch)
finds the images already written and does not generate them again. A row without a seed gets one derived from
its file, line and text, so reruns reproduce it.

Every row, good or bad, becomes one prediction row (``PREDICTION_COLUMNS``). The first five columns are the
ones Azure's text-to-image batch samples read from ``predictions.csv`` (row number, prompt, image file name,
nsfw flag, input file); ``seed``, ``status`` (ok, exists, blocked, error) and ``error`` follow. A file that cannot
be read or a row that is invalid is reported with its file and line, and everything else is still processed.
Failures that are not the input's fault (the model, the GPU, content screening unavailable) raise, so that Azure
retries the mini-batch and counts it against ``error_threshold``.

``python -m sd_endpoint.batch --worker`` serves the same core over stdin/stdout for ``batch_score.py`` when
Azure's batch driver runs in another Python environment (see environment/README.md).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sd_endpoint.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from sd_endpoint.contract import RowRequest
    from sd_endpoint.service import GenerationService

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "line",
    "prompt",
    "generated_image",
    "nsfw_content_detected",
    "input_file",
    "seed",
    "status",
    "error",
)
INPUT_COLUMNS = ("prompt", "negative_prompt", "seed")
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}
IMAGE_SUFFIX = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PREDICTIONS_FILE = "predictions.csv"
_DERIVED_SEED_BITS = 31
_MAX_REPORTED = 20

Status = Literal["ok", "exists", "blocked", "error"]


class BatchSettings(BaseSettings):
    """Batch-only settings (``SD_ENDPOINT_BATCH_*``); generation settings are the server's ``SD_ENDPOINT_*``."""

    model_config = SettingsConfigDict(env_prefix="SD_ENDPOINT_BATCH_", extra="ignore", populate_by_name=True)

    parameters: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="Generation parameters for every row, as JSON (the request's parameters)."
    )
    fail_on_bad_input: bool = Field(
        default=False, description="Fail the mini-batch (after writing its good rows) when a file or row is bad."
    )
    python: str | None = Field(
        default=None, description="Run generation in this interpreter (the image's sd-endpoint environment)."
    )
    output_path: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("AZUREML_BI_OUTPUT_PATH", "output_path"),
        description="Set by Azure ML: the job's output folder.",
    )

    @field_validator("parameters", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError('expected a JSON object, e.g. {"num_inference_steps": 30}')
        return value


class BatchInputError(Exception):
    """Raised after a mini-batch when SD_ENDPOINT_BATCH_FAIL_ON_BAD_INPUT is on and some input was bad."""


# ------------------------------------------------------------------------------------------------
# Reading input files


@dataclass(frozen=True)
class InputRow:
    """One prompt read from a file; ``line`` is 1-based and counts the CSV header."""

    file: str
    line: int
    prompt: Any
    negative_prompt: Any = None
    seed: Any = None
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class BadInput:
    file: str
    line: int | None  # None: the whole file
    message: str

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


def read_input(path: Path) -> tuple[list[InputRow], list[BadInput]]:
    """Rows and problems of one input file; never raises for the file's content."""
    name = path.name
    kind = SUFFIXES.get(path.suffix.lower())
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
    return [InputRow(name, n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_jsonl(name: str, text: str) -> tuple[list[InputRow], list[BadInput]]:
    rows: list[InputRow] = []
    bad: list[BadInput] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(BadInput(name, n, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if isinstance(value, str):
            rows.append(InputRow(name, n, value))
        elif isinstance(value, dict):
            unknown = tuple(k for k in value if k not in INPUT_COLUMNS)
            rows.append(
                InputRow(name, n, value.get("prompt"), value.get("negative_prompt"), value.get("seed"), unknown)
            )
        else:
            bad.append(BadInput(name, n, 'expected a JSON object {"prompt": ...} or a JSON string'))
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
    while True:
        start = last + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad.append(BadInput(name, start, f"not valid CSV ({exc})"))
            break  # the reader cannot resynchronise after a broken quote
        last = reader.line_num
        if not any(field.strip() for field in record):
            continue
        if len(record) != len(columns):
            bad.append(BadInput(name, start, f"has {len(record)} fields but the header has {len(columns)}"))
            continue
        values = dict(zip(columns[1:] if skip_first else columns, record[1:] if skip_first else record, strict=True))
        rows.append(
            InputRow(name, start, values["prompt"], values.get("negative_prompt") or None, values.get("seed") or None)
        )
    return rows, bad


def _csv_seed(value: Any) -> Any:
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
    stem = re.sub(r"[^A-Za-z0-9]+", "_", file).strip("_")[:80] or "input"
    return f"{stem}_L{line:06d}_s{seed}.{IMAGE_SUFFIX[output_format]}"


# ------------------------------------------------------------------------------------------------
# Prediction rows


@dataclass(frozen=True)
class Prediction:
    line: int | None
    prompt: str
    generated_image: str
    nsfw_content_detected: bool | None
    input_file: str
    seed: int | None
    status: Status
    error: str = ""

    def as_list(self) -> list[Any]:
        return [
            "" if self.line is None else self.line,
            self.prompt,
            self.generated_image,
            "" if self.nsfw_content_detected is None else self.nsfw_content_detected,
            self.input_file,
            "" if self.seed is None else self.seed,
            self.status,
            self.error,
        ]

    def as_csv_line(self) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow(self.as_list())
        return buf.getvalue()


def read_predictions(path: Path) -> list[dict[str, str]]:
    """Rows of a predictions.csv (no header, as Azure writes it) as dicts keyed by PREDICTION_COLUMNS."""
    with path.open(newline="", encoding="utf-8") as fh:
        return [dict(zip(PREDICTION_COLUMNS, rec, strict=False)) for rec in csv.reader(fh) if rec]


@dataclass
class Summary:
    files: int = 0
    rows: int = 0
    generated: int = 0
    existing: int = 0
    blocked: int = 0
    errors: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def add(self, predictions: Iterable[Prediction]) -> None:
        for p in predictions:
            self.rows += 1
            if p.status == "ok":
                self.generated += 1
            elif p.status == "exists":
                self.existing += 1
            elif p.status == "blocked":
                self.blocked += 1
            else:
                self.errors += 1
                self.problems.append(f"{p.input_file}{'' if p.line is None else f':{p.line}'}: {p.error}")

    def text(self) -> str:
        rate = f", {self.generated / self.seconds:.2f} images/s" if self.seconds > 0 and self.generated else ""
        return (
            f"{self.files} file(s), {self.rows} row(s): {self.generated} generated, {self.existing} already "
            f"present, {self.blocked} blocked, {self.errors} error(s) in {self.seconds:.1f} s{rate}"
        )


# ------------------------------------------------------------------------------------------------
# The runner


@dataclass(frozen=True)
class _Planned:
    input: InputRow
    row: RowRequest
    names: tuple[str, ...]


class BatchRunner:
    """Turns input files into images in ``output_dir`` and prediction rows; holds one loaded service."""

    def __init__(
        self,
        service: GenerationService,
        output_dir: Path,
        parameters: dict[str, Any] | None = None,
        *,
        fail_on_bad_input: bool = False,
    ) -> None:
        self.service = service
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.parameters = dict(parameters or {})
        self.fail_on_bad_input = fail_on_bad_input
        limits = service.limits
        self.group_images = max(1, min(service.settings.max_batch_size, limits.max_images))
        # Validate the shared parameters once, with a message naming where they came from.
        try:
            probe = self.service.parse({"input_data": {"data": ["probe"]}, "parameters": self.parameters})
        except InvalidRequest as exc:
            raise ConfigError(
                f"Batch parameters (SD_ENDPOINT_BATCH_PARAMETERS / --parameters): {exc.message}"
            ) from None
        self.spec = probe.spec
        self.output_format = probe.output_format

    @classmethod
    def from_env(cls, output_dir: Path | None = None, **overrides: Any) -> BatchRunner:
        """Build the service from SD_ENDPOINT_* / AZUREML_MODEL_DIR / CONTENT_SAFETY_* and the batch settings."""
        from sd_endpoint.service import GenerationService
        from sd_endpoint.settings import load, load_settings

        batch = load(BatchSettings)
        out = output_dir or batch.output_path
        if out is None:
            raise ConfigError("AZUREML_BI_OUTPUT_PATH: not set; the batch runner needs an output folder.")
        settings = load_settings(**overrides)
        if settings.device == "auto":
            slot = _gpu_slot()
            if slot is not None:
                settings = settings.model_copy(update={"device": f"cuda:{slot}"})
        service = GenerationService.from_settings(settings)
        service.warmup()
        return cls(service, out, batch.parameters, fail_on_bad_input=batch.fail_on_bad_input)

    # -- planning ------------------------------------------------------------------------------
    def _plan_file(self, path: Path) -> tuple[list[_Planned], list[Prediction]]:
        inputs, bad = read_input(path)
        errors = [_error(b.file, b.line, b.message) for b in bad]
        planned: list[_Planned] = []
        for item in inputs:
            try:
                planned.append(self._plan_row(item))
            except InvalidRequest as exc:
                errors.append(_error(item.file, item.line, exc.message, prompt=item.prompt))
        return planned, errors

    def _plan_row(self, item: InputRow) -> _Planned:
        if item.extra:
            raise InvalidRequest(
                f"unknown key(s) {', '.join(map(repr, item.extra))}; allowed: {', '.join(INPUT_COLUMNS)}."
            )
        if item.prompt is None:
            raise InvalidRequest("missing 'prompt'.")
        row: dict[str, Any] = {"prompt": item.prompt}
        if item.negative_prompt is not None:
            row["negative_prompt"] = item.negative_prompt
        seed = _csv_seed(item.seed)
        if isinstance(seed, str):
            raise InvalidRequest(f"seed: must be a whole number from 0 to 2**63-1 (got {seed!r}).")
        if seed is not None:
            row["seed"] = seed
        elif "seed" not in self.parameters:
            row["seed"] = derived_seed(item)
        body = {"input_data": {"data": [row]}, "parameters": self.parameters}
        try:
            request = self.service.parse(body)
        except InvalidRequest as exc:
            # The contract names fields of a request body; a batch user thinks in columns of a row.
            message = exc.message.removeprefix("Invalid request: ").replace(" (got a JSON string)", "")
            raise InvalidRequest(re.sub(r"input_data\.data\[0\]\.?|input_data\.", "", message)) from None
        parsed = request.rows[0]
        names = tuple(image_name(item.file, item.line, s, self.output_format) for s in parsed.seeds)
        return _Planned(item, parsed, names)

    # -- running -------------------------------------------------------------------------------
    def run_files(
        self, paths: Sequence[Path], progress: Callable[[int], None] | None = None
    ) -> tuple[list[Prediction], Summary]:
        """Process the files in order; ``progress(n)`` is called as images are finished."""
        started = time.perf_counter()
        summary = Summary(files=len(paths))
        plans = [self._plan_file(Path(p)) for p in paths]
        out: list[Prediction] = []
        for planned, errors in plans:
            rows = self._run_planned(planned, progress) + errors
            rows.sort(key=lambda p: (p.line is not None, p.line or 0))
            out.extend(rows)
        summary.add(out)
        summary.seconds = time.perf_counter() - started
        if self.fail_on_bad_input and summary.errors:
            shown = "; ".join(summary.problems[:_MAX_REPORTED])
            raise BatchInputError(
                f"{summary.errors} bad input row(s) or file(s) (SD_ENDPOINT_BATCH_FAIL_ON_BAD_INPUT): {shown}"
            )
        return out, summary

    def pending_images(self, paths: Sequence[Path]) -> int:
        """How many images the files still need (for a progress bar's total)."""
        count = 0
        for path in paths:
            for p in self._plan_file(Path(path))[0]:
                count += sum(1 for n in p.names if not self._done(n))
        return count

    def _done(self, name: str) -> bool:
        path = self.output_dir / name
        try:
            return path.stat().st_size > 0
        except OSError:
            return False

    def _run_planned(self, planned: list[_Planned], progress: Callable[[int], None] | None) -> list[Prediction]:
        out: list[Prediction] = []
        todo: list[_Planned] = []
        for p in planned:
            if all(self._done(n) for n in p.names):
                out.extend(
                    Prediction(p.input.line, p.row.prompt, n, None, p.input.file, s, "exists")
                    for n, s in zip(p.names, p.row.seeds, strict=True)
                )
            else:
                todo.append(p)
        for group in self._groups(todo):
            out.extend(self._generate(group))
            if progress is not None:
                progress(sum(len(p.names) for p in group))
        return out

    def _groups(self, todo: list[_Planned]) -> Iterator[list[_Planned]]:
        group: list[_Planned] = []
        images = 0
        for p in todo:
            n = len(p.names)
            if group and images + n > self.group_images:
                yield group
                group, images = [], 0
            group.append(p)
            images += n
        if group:
            yield group

    def _generate(self, group: list[_Planned]) -> list[Prediction]:
        import base64

        from sd_endpoint.contract import ScoringRequest
        from sd_endpoint.jobs import CancelToken

        rows = tuple(replace(p.row, position=i, index=i) for i, p in enumerate(group))
        request = ScoringRequest(self.spec, self.output_format, rows)
        # No deadline: a batch row has no client waiting; Azure's retry_settings.timeout bounds a mini-batch.
        result = self.service.score(request, CancelToken(None))
        records = iter(result.records)
        out: list[Prediction] = []
        for p in group:
            for name, seed in zip(p.names, p.row.seeds, strict=True):
                record = next(records)
                nsfw = record.get("nsfw_content_detected")
                if record.get("blocked") is not None or not record.get("generated_image"):
                    out.append(
                        Prediction(
                            p.input.line,
                            p.row.prompt,
                            "",
                            True,
                            p.input.file,
                            seed,
                            "blocked",
                            _blocked_text(record.get("blocked")),
                        )
                    )
                    continue
                _write_atomic(self.output_dir / name, base64.b64decode(record["generated_image"]))
                warnings = "; ".join(record.get("warnings") or [])
                out.append(Prediction(p.input.line, p.row.prompt, name, nsfw, p.input.file, seed, "ok", warnings))
        return out


def _blocked_text(blocked: Any) -> str:
    if not isinstance(blocked, dict):
        return "blocked by content screening"
    cats = ", ".join(f"{k}={v}" for k, v in (blocked.get("categories") or {}).items())
    lists = ", ".join(blocked.get("blocklists") or [])
    detail = "; ".join(x for x in (cats, f"blocklists {lists}" if lists else "") if x)
    return f"blocked at the {blocked.get('stage', '?')} stage" + (f" ({detail})" if detail else "")


def _error(file: str, line: int | None, message: str, *, prompt: Any = "") -> Prediction:
    text = prompt if isinstance(prompt, str) else ""
    return Prediction(line, text, "", None, file, None, "error", message)


def _write_atomic(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a file that a rerun would take for a finished image.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _gpu_slot() -> int | None:
    """On a multi-GPU node, give each batch process (max_concurrency_per_instance) its own GPU."""
    try:
        import torch
    except ImportError:
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        return None
    return claim_gpu_slot(count, Path(os.environ.get("TMPDIR", "/tmp")))


_held_locks: list[Any] = []


def claim_gpu_slot(count: int, lock_dir: Path) -> int:
    """The first of ``count`` slots no other process holds (an flock held for this process's life).

    When every slot is taken (more processes than GPUs), processes share by pid.
    """
    import fcntl

    for slot in range(count):
        fh = open(lock_dir / f"sd-endpoint-gpu-{slot}.lock", "a")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _held_locks.append(fh)
        return slot
    return os.getpid() % count


# ------------------------------------------------------------------------------------------------
# Local command: sd-endpoint batch INPUT OUTPUT


def input_files(source: Path) -> list[Path]:
    """A file, or every non-hidden file under a folder, sorted."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ConfigError(f"{source}: no such file or folder.")
    return sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )


def write_predictions(path: Path, rows: Iterable[Prediction]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        for row in rows:
            writer.writerow(row.as_list())
    os.replace(tmp, path)


def _load_parameters(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--parameters: not valid JSON ({exc}).") from None
    if not isinstance(params, dict):
        raise ConfigError('--parameters: expected a JSON object, e.g. {"num_inference_steps": 30}.')
    return params


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sd_endpoint.cli import settings_overrides
    from sd_endpoint.service import GenerationService
    from sd_endpoint.settings import load, load_settings

    files = input_files(Path(args.input))
    out_dir = Path(args.output)
    params = {**load(BatchSettings).parameters, **_load_parameters(args.parameters)}
    service = GenerationService.from_settings(load_settings(warmup=False, **settings_overrides(args)))
    try:
        runner = BatchRunner(service, out_dir, params)
        total = runner.pending_images(files)
        with tqdm(total=total, unit="img", desc="generating", disable=args.quiet) as bar:
            rows, summary = runner.run_files(files, progress=bar.update)
    finally:
        service.close()
    write_predictions(out_dir / PREDICTIONS_FILE, rows)
    for problem in summary.problems[:_MAX_REPORTED]:
        sys.stderr.write(f"error: {problem}\n")
    if len(summary.problems) > _MAX_REPORTED:
        sys.stderr.write(f"... and {len(summary.problems) - _MAX_REPORTED} more (see {PREDICTIONS_FILE})\n")
    sys.stderr.write(summary.text() + "\n")
    sys.stdout.write(f"{out_dir / PREDICTIONS_FILE}\n")
    return 1 if summary.errors else 0


def register_cli(subparsers: Any) -> None:
    from sd_endpoint.cli import add_model_options

    p = subparsers.add_parser(
        "batch",
        help="Generate an image for every prompt in a folder of .csv/.jsonl/.txt files (resumable).",
        description="Reads INPUT (a file or a folder of .csv, .jsonl and .txt files), writes one image per row "
        "into OUTPUT and OUTPUT/predictions.csv. Images already in OUTPUT are not generated again. Exits 1 when "
        "some file or row was bad (each is listed; the rest is still processed).",
    )
    p.add_argument("input", help="A file or folder of input files.")
    p.add_argument("output", help="Output folder for the images and predictions.csv.")
    p.add_argument(
        "--parameters",
        help='Generation parameters as JSON, or @file.json, e.g. \'{"num_inference_steps": 30, "seed": 7}\' '
        "(added to SD_ENDPOINT_BATCH_PARAMETERS).",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    add_model_options(p)
    p.set_defaults(func=_cli)


# ------------------------------------------------------------------------------------------------
# Worker: the runner behind a pipe, for batch_score.py in another interpreter
#
# Protocol, one JSON object per line. Worker -> driver first: {"ready": true} (or {"error": ...} and exit 2).
# Driver -> worker: {"files": [paths]}; worker -> driver: {"rows": [[...PREDICTION_COLUMNS values]]} or
# {"error": message, "kind": "input"|"failure"}. EOF on stdin ends the worker.


def worker_main() -> int:
    from sd_endpoint.logs import setup_logging

    # Keep the protocol channel private: anything a library prints goes to stderr (the job's log).
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    setup_logging(os.environ.get("SD_ENDPOINT_LOG_LEVEL", "INFO"), os.environ.get("SD_ENDPOINT_LOG_FORMAT", "text"))

    def send(obj: dict[str, Any]) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        runner = BatchRunner.from_env()
    except Exception as exc:  # reported to the driver, which fails init() with it
        log.exception("Batch worker could not start")
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 2
    send({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            files = [Path(f) for f in json.loads(line)["files"]]
            rows, _ = runner.run_files(files)
            send({"rows": [r.as_list() for r in rows]})
        except BatchInputError as exc:
            send({"error": str(exc), "kind": "input"})
        except Exception as exc:
            log.exception("Batch worker failed on a mini-batch")
            send({"error": f"{type(exc).__name__}: {exc}", "kind": "failure"})
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main())
    sys.stderr.write("usage: python -m sd_endpoint.batch --worker   (or: sd-endpoint batch INPUT OUTPUT)\n")
    sys.exit(2)
