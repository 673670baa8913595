"""The batch runner: input files in, images and prediction rows out, through one loaded GenerationService.

Each image is written to the output folder as ``<file>_L<line>_s<seed>.<ext>``; that name is a pure function
of the input file, the line and the seed, so a rerun (or an Azure retry of a mini-batch) finds the images
already written and does not generate them again. A row without a seed gets one derived from its file, line
and text, so reruns reproduce it. Rows with an ``image`` (and ``mask_image``) column are image-to-image (and
inpainting) rows; consecutive rows of the same task and size share a pipeline call. Every row, good or bad,
becomes one ``Prediction``. A file that cannot be read or a row that is invalid is reported with its file and
line, and everything else is still processed.
Failures that are not the input's fault (the model, the GPU, content screening unavailable) raise, so that
Azure retries the mini-batch and counts it against ``error_threshold``.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_endpoint.batch.inputs import INPUT_COLUMNS, InputRow, csv_seed, derived_seed, image_name, read_input
from sd_endpoint.batch.predictions import Prediction, Status, append_details, write_atomic
from sd_endpoint.batch.settings import BatchSettings
from sd_endpoint.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from sd_endpoint.contract import RowRequest, ScoringRequest
    from sd_endpoint.jobs import GenerationSpec
    from sd_endpoint.service import GenerationService

MAX_REPORTED = 20


class BatchInputError(Exception):
    """Raised after a mini-batch when SD_ENDPOINT_BATCH_FAIL_ON_BAD_INPUT is on and some input was bad."""


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


@dataclass(frozen=True)
class _Planned:
    input: InputRow
    row: RowRequest  # without its decoded images: they are read again when the row is generated
    names: tuple[str, ...]
    spec: GenerationSpec
    folder: Path  # the input file's folder: image file names are relative to it

    def prediction(self, name: str, seed: int, status: Status) -> Prediction:
        return Prediction(self.input.row, self.input.line, self.row.prompt, name, None, self.input.file, seed, status)


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
        probe_row: dict[str, Any] = {"prompt": "probe"}
        if "strength" in self.parameters:  # an image-to-image parameter: probe with an image row
            probe_row["image"] = _probe_image()
        try:
            probe = self.service.parse({"input_data": {"data": [probe_row]}, "parameters": self.parameters})
        except InvalidRequest as exc:
            raise ConfigError(
                f"Batch parameters (SD_ENDPOINT_BATCH_PARAMETERS / --parameters): {exc.message}"
            ) from None
        self.output_format = probe.output_format

    @classmethod
    def from_env(cls, output_dir: Path | None = None, **overrides: Any) -> BatchRunner:
        """Build the service from SD_ENDPOINT_* / AZUREML_MODEL_DIR / CONTENT_SAFETY_* and the batch settings."""
        from sd_endpoint.batch.gpu_slots import gpu_slot
        from sd_endpoint.service import GenerationService
        from sd_endpoint.settings import load, load_settings

        batch = load(BatchSettings)
        out = output_dir or batch.output_path
        if out is None:
            raise ConfigError("AZUREML_BI_OUTPUT_PATH: not set; the batch runner needs an output folder.")
        settings = load_settings(**overrides)
        if settings.device == "auto":
            slot = gpu_slot()
            if slot is not None:
                settings = settings.model_copy(update={"device": f"cuda:{slot}"})
        service = GenerationService.from_settings(settings)
        service.warmup()
        return cls(service, out, batch.parameters, fail_on_bad_input=batch.fail_on_bad_input)

    # -- planning ------------------------------------------------------------------------------
    def _plan_file(self, path: Path) -> tuple[list[_Planned], list[Prediction]]:
        inputs, bad = read_input(path)
        errors = [_error(b.file, b.row, b.line, b.message) for b in bad]
        planned: list[_Planned] = []
        for item in inputs:
            try:
                planned.append(self._plan_row(item, path.parent))
            except InvalidRequest as exc:
                errors.append(_error(item.file, item.row, item.line, exc.message, prompt=item.prompt))
        return planned, errors

    def _plan_row(self, item: InputRow, folder: Path) -> _Planned:
        request = self._parse_row(item, folder)
        parsed = request.rows[0]
        names = tuple(image_name(item.file, item.line, s, self.output_format) for s in parsed.seeds)
        # Planning holds every row of a mini-batch at once; the decoded images wait for their turn on disk.
        return _Planned(item, replace(parsed, image=None, mask=None), names, request.spec, folder)

    def _parse_row(self, item: InputRow, folder: Path) -> ScoringRequest:
        if item.extra:
            raise InvalidRequest(
                f"unknown key(s) {', '.join(map(repr, item.extra))}; allowed: {', '.join(INPUT_COLUMNS)}."
            )
        if item.prompt is None:
            raise InvalidRequest("missing 'prompt'.")
        row: dict[str, Any] = {"prompt": item.prompt}
        for column in ("image", "mask_image"):
            value = getattr(item, column)
            if value is not None:
                row[column] = self._image_value(value, folder, column)
        if item.negative_prompt is not None:
            row["negative_prompt"] = item.negative_prompt
        seed = csv_seed(item.seed)
        if isinstance(seed, str):
            raise InvalidRequest(f"seed: must be a whole number from 0 to 2**63-1 (got {seed!r}).")
        if seed is not None:
            row["seed"] = seed
        elif "seed" not in self.parameters:
            row["seed"] = derived_seed(item)
        parameters = self.parameters
        if "image" not in row:  # a shared strength is for the file's image rows; text rows have none
            parameters = {k: v for k, v in parameters.items() if k != "strength"}
        body = {"input_data": {"data": [row]}, "parameters": parameters}
        try:
            return self.service.parse(body)
        except InvalidRequest as exc:
            # The contract names fields of a request body; a batch user thinks in columns of a row.
            message = exc.message.removeprefix("Invalid request: ").replace(" (got a JSON string)", "")
            raise InvalidRequest(re.sub(r"input_data\.data\[0\]\.?|input_data\.", "", message)) from None

    def _image_value(self, value: Any, folder: Path, column: str) -> Any:
        """A file name relative to the input file's folder becomes the file's base64; base64 stays as it is.

        Base64 has no '.', a file name has an extension: that tells them apart.
        """
        if not isinstance(value, str):
            return value  # the contract names the wrong type
        text = value.strip()
        if "." not in text or text.startswith(("data:", "https://", "http://")):
            return text
        root = folder.resolve()
        path = (root / text).resolve()
        if not path.is_relative_to(root):
            raise InvalidRequest(f"{column}: {text!r} is outside the input file's folder; image files must be in it.")
        limit = self.service.limits.max_image_bytes
        try:
            size = path.stat().st_size
            if size > limit:
                raise InvalidRequest(
                    f"{column}: {text!r} is {size} bytes; the limit is {limit} bytes (SD_ENDPOINT_MAX_IMAGE_BYTES)."
                )
            data = path.read_bytes()
        except FileNotFoundError:
            raise InvalidRequest(
                f"{column}: no file {text!r} in the input file's folder (image file names are relative to it)."
            ) from None
        except OSError as exc:
            raise InvalidRequest(f"{column}: cannot read {text!r} ({exc.strerror or exc}).") from None
        return base64.b64encode(data).decode("ascii")

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
            shown = "; ".join(summary.problems[:MAX_REPORTED])
            raise BatchInputError(
                f"{summary.errors} bad input row(s) or file(s) (SD_ENDPOINT_BATCH_FAIL_ON_BAD_INPUT): {shown}"
            )
        return out, summary

    def run_mini_batch(self, paths: Sequence[Path]) -> tuple[list[Prediction], Summary]:
        """Azure's ``run(mini_batch)``: ``run_files``, then the rows appended to predictions_details.csv.

        Nothing is appended for a mini-batch that raises, exactly as Azure appends nothing to predictions.csv.
        """
        rows, summary = self.run_files(paths)
        append_details(self.output_dir, rows)
        return rows, summary

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
                out.extend(p.prediction(n, s, "exists") for n, s in zip(p.names, p.row.seeds, strict=True))
            else:
                todo.append(p)
        for group in self._groups(todo):
            out.extend(self._generate(group))
            if progress is not None:
                progress(sum(len(p.names) for p in group))
        return out

    def _groups(self, todo: list[_Planned]) -> Iterator[list[_Planned]]:
        """Consecutive rows of one spec (task, size), up to the batch size."""
        group: list[_Planned] = []
        images = 0
        for p in todo:
            n = len(p.names)
            if group and (images + n > self.group_images or p.spec != group[0].spec):
                yield group
                group, images = [], 0
            group.append(p)
            images += n
        if group:
            yield group

    def _generate(self, group: list[_Planned]) -> list[Prediction]:
        from sd_endpoint.contract import ScoringRequest
        from sd_endpoint.jobs import CancelToken

        out: list[Prediction] = []
        ready: list[_Planned] = []
        rows: list[RowRequest] = []
        for p in group:
            try:
                rows.append(replace(self._with_images(p), position=len(rows), index=len(rows)))
                ready.append(p)
            except InvalidRequest as exc:  # an image file changed or went away since planning
                out.append(_error(p.input.file, p.input.row, p.input.line, exc.message, prompt=p.input.prompt))
        if not rows:
            return out
        request = ScoringRequest(group[0].spec, self.output_format, tuple(rows))
        # No deadline: a batch row has no client waiting; Azure's retry_settings.timeout bounds a mini-batch.
        result = self.service.score(request, CancelToken(None))
        records = iter(result.records)
        for p in ready:
            for name, seed in zip(p.names, p.row.seeds, strict=True):
                record = next(records)
                base = p.prediction(name, seed, "ok")
                if record.get("blocked") is not None or not record.get("generated_image"):
                    blocked = _blocked_text(record.get("blocked"))
                    out.append(
                        replace(base, generated_image="", nsfw_content_detected=True, status="blocked", error=blocked)
                    )
                    continue
                write_atomic(self.output_dir / name, base64.b64decode(record["generated_image"]))
                warnings = "; ".join(record.get("warnings") or [])
                out.append(replace(base, nsfw_content_detected=record.get("nsfw_content_detected"), error=warnings))
        return out

    def _with_images(self, p: _Planned) -> RowRequest:
        if p.spec.task == "text-to-image":
            return p.row
        request = self._parse_row(p.input, p.folder)
        if request.spec != p.spec:
            raise InvalidRequest("the row's image changed size while the mini-batch ran.")
        row = request.rows[0]
        return replace(p.row, image=row.image, mask=row.mask)


def _probe_image() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _blocked_text(blocked: Any) -> str:
    if not isinstance(blocked, dict):
        return "blocked by content screening"
    cats = ", ".join(f"{k}={v}" for k, v in (blocked.get("categories") or {}).items())
    lists = ", ".join(blocked.get("blocklists") or [])
    detail = "; ".join(x for x in (cats, f"blocklists {lists}" if lists else "") if x)
    return f"blocked at the {blocked.get('stage', '?')} stage" + (f" ({detail})" if detail else "")


def _error(file: str, row: int | None, line: int | None, message: str, *, prompt: Any = "") -> Prediction:
    text = prompt if isinstance(prompt, str) else ""
    return Prediction(row, line, text, "", None, file, None, "error", message)
