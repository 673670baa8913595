"""The one core every envelope calls: validate, screen, generate, encode, build records.

``score.py`` (azmlinfsrv), the FastAPI server and the batch script only translate their transport to
``GenerationService.handle``/``score`` and back; no model logic lives in them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from sd_endpoint import metrics
from sd_endpoint.backends.base import Backend
from sd_endpoint.contract import Limits, RowRequest, ScoringRequest, decode_body, parse_request
from sd_endpoint.errors import GenerationFailed, ScreeningUnavailable
from sd_endpoint.imaging import encode_image, to_base64
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.safety.base import NullScreener, Screener, Verdict
from sd_endpoint.settings import ContentSafetySettings, Settings

log = logging.getLogger(__name__)
CPU_WARMUP_SIZE = 128  # a multiple of 64: every SD UNet level divides its latent

# Response header naming the screening outcome: "screened", or "skipped" when it failed open.
SAFETY_HEADER = "x-content-safety"

GenerateFn = Callable[[GenerationSpec, Sequence[ImageTask], "CancelToken | None"], BatchResult]


@dataclass
class ScoreResult:
    records: list[dict[str, Any]]
    headers: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    images: int = 0
    steps: int = 0
    blocked: int = 0


class GenerationService:
    """Holds the loaded backend and the screening stage; safe to call from many threads."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        screener: Screener | None = None,
        *,
        fail_open: bool = False,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.screener: Screener = screener or NullScreener()
        self.fail_open = fail_open
        height, width = backend.native_size
        self.limits = Limits(
            max_images=settings.max_images_per_request,
            max_pixels=settings.max_pixels,
            max_steps=settings.max_steps,
            max_prompt_chars=settings.max_prompt_chars,
            default_height=settings.default_height or height,
            default_width=settings.default_width or width,
            default_steps=settings.default_steps,
            default_guidance_scale=settings.default_guidance_scale,
            max_image_bytes=settings.max_image_bytes,
            max_input_pixels=settings.max_input_pixels,
        )
        self.ready = False
        self._encoder = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        safety: ContentSafetySettings | None = None,
        screener: Screener | None = None,
    ) -> GenerationService:
        """Load the model and the screening stage as configured; raises ModelLoadError/ConfigError."""
        from sd_endpoint.backends import create_backend
        from sd_endpoint.safety import build_screener
        from sd_endpoint.settings import load

        safety = safety or load(ContentSafetySettings)
        if screener is None:
            screener = build_screener(safety)  # misconfiguration fails here, at start-up
        started = time.perf_counter()
        backend = create_backend(settings)
        metrics.MODEL_LOAD_SECONDS.set(time.perf_counter() - started)
        metrics.BACKEND.info({k: str(v) for k, v in backend.describe().items()})
        return cls(settings, backend, screener, fail_open=safety.fail_open)

    def warmup(self) -> float:
        """One small generation, so the first request does not pay for lazy initialisation."""
        started = time.perf_counter()
        if self.settings.warmup:
            height, width = self.warmup_size()
            spec = GenerationSpec(height, width, 2, 7.5, "ddim", 0.0)
            self.backend.generate(spec, [ImageTask("warm-up", None, 0)])
        self.ready = True
        metrics.READY.set(1)
        seconds = time.perf_counter() - started
        log.info("Warm-up done in %.2f s; ready", seconds)
        return seconds

    def warmup_size(self) -> tuple[int, int]:
        """The warm-up image: native size on a GPU (kernels, graphs and autotuning are per shape); small on a CPU,
        where the lazy initialisation it pays for does not depend on the size and a full-size 768x768 warm-up
        took about 110 s and 2.6 GiB more peak memory on a 2-core machine."""
        if str(self.backend.describe().get("device", "")).startswith("cpu"):
            return CPU_WARMUP_SIZE, CPU_WARMUP_SIZE
        return self.limits.default_height, self.limits.default_width

    def close(self) -> None:
        self._encoder.shutdown(wait=False)
        self.screener.close()

    # -- requests ------------------------------------------------------------------------------
    def parse(self, body: bytes | str | dict[str, Any]) -> ScoringRequest:
        if isinstance(body, (bytes, str)):
            body = decode_body(body, max_bytes=self.settings.max_body_bytes)
        return parse_request(body, self.limits, decoded=True)

    def handle(self, body: bytes | str | dict[str, Any], cancel: CancelToken | None = None) -> ScoreResult:
        return self.score(self.parse(body), cancel)

    def new_cancel_token(self) -> CancelToken:
        return CancelToken.with_timeout_ms(self.settings.request_timeout_ms)

    def score(
        self,
        request: ScoringRequest,
        cancel: CancelToken | None = None,
        generate: GenerateFn | None = None,
    ) -> ScoreResult:
        """Run one validated request. ``generate`` lets the server route through its micro-batcher."""
        cancel = cancel or self.new_cancel_token()
        generate = generate or self.backend.generate
        timings: dict[str, float] = {}
        headers: dict[str, str] = {}
        rows = request.rows
        screening = self.screener.enabled
        skipped = False

        prompt_verdicts: list[Verdict | None] = [None] * len(rows)
        if screening:
            t = time.perf_counter()
            try:
                prompt_verdicts = list(self.screener.screen_prompts([(r.prompt, r.negative_prompt) for r in rows]))
            except ScreeningUnavailable as exc:
                skipped = self._fail_open_or_raise(exc)
            timings["screen_prompt"] = time.perf_counter() - t
            metrics.SCREENING_SECONDS.labels("prompt").observe(timings["screen_prompt"])
        # A blocked input image blocks its row from here on, as a blocked prompt does.
        if screening and not skipped and request.spec.task != "text-to-image":
            t = time.perf_counter()
            try:
                prompt_verdicts = self._screen_inputs(rows, prompt_verdicts)
            except ScreeningUnavailable as exc:
                skipped = self._fail_open_or_raise(exc)
            timings["screen_input_image"] = time.perf_counter() - t
            metrics.SCREENING_SECONDS.labels("input_image").observe(timings["screen_input_image"])

        tasks: list[ImageTask] = []
        owners: list[tuple[int, int]] = []  # (row position, image number) for each task
        for row, verdict in zip(rows, prompt_verdicts, strict=True):
            if verdict is not None and verdict.blocked:
                self._count_blocked(verdict)
                continue
            for k, task in enumerate(row.tasks()):
                tasks.append(task)
                owners.append((row.position, k))

        result = BatchResult([], 0, 0.0)
        if tasks:
            t = time.perf_counter()
            result = generate(request.spec, tasks, cancel)
            timings["generate"] = time.perf_counter() - t
            if len(result.images) != len(tasks):
                raise GenerationFailed(f"The backend returned {len(result.images)} images for {len(tasks)} tasks.")

        t = time.perf_counter()
        fmt = request.output_format
        encoded = list(self._encoder.map(lambda im: encode_image(im, fmt), result.images))
        timings["encode"] = time.perf_counter() - t
        metrics.ENCODE_SECONDS.observe(timings["encode"])

        image_verdicts: list[Verdict | None] = [None] * len(encoded)
        if screening and not skipped and encoded:
            t = time.perf_counter()
            try:
                image_verdicts = list(self.screener.screen_images(encoded))
            except ScreeningUnavailable as exc:
                skipped = self._fail_open_or_raise(exc)
            timings["screen_image"] = time.perf_counter() - t
            metrics.SCREENING_SECONDS.labels("image").observe(timings["screen_image"])

        if screening:
            headers[SAFETY_HEADER] = "skipped" if skipped else "screened"
        records, blocked = self._records(
            rows, prompt_verdicts, owners, encoded, image_verdicts, result.notes, screening and not skipped
        )
        return ScoreResult(records, headers, timings, len(tasks), result.steps_done, blocked)

    # -- helpers -------------------------------------------------------------------------------
    def _screen_inputs(self, rows: Sequence[RowRequest], verdicts: Sequence[Verdict | None]) -> list[Verdict | None]:
        """Screen each input image whose prompt passed; a blocked input blocks its row, like a prompt."""
        todo = [
            (i, row.image)
            for i, (row, v) in enumerate(zip(rows, verdicts, strict=True))
            if row.image is not None and (v is None or not v.blocked)
        ]
        out = list(verdicts)
        if not todo:
            return out
        # The image as the model sees it (RGB, resized into the pixel cap): within the screening
        # service's size limits whatever was uploaded.
        encoded = list(self._encoder.map(lambda item: encode_image(item[1], "png"), todo))
        for (i, _), verdict in zip(todo, self.screener.screen_images(encoded), strict=True):
            if verdict.blocked:
                out[i] = replace(verdict, stage="input_image")
        return out

    def _fail_open_or_raise(self, exc: ScreeningUnavailable) -> bool:
        if not self.fail_open:
            raise exc
        metrics.SCREENING_SKIPPED.inc()
        log.warning("Content screening unavailable; answering unscreened (CONTENT_SAFETY_FAIL_OPEN): %s", exc)
        return True

    def _count_blocked(self, verdict: Verdict) -> None:
        for category in verdict.blocked_categories or {"blocklist": 0}:
            metrics.BLOCKED.labels(verdict.stage, category).inc()

    def _records(
        self,
        rows: Sequence[RowRequest],
        prompt_verdicts: Sequence[Verdict | None],
        owners: Sequence[tuple[int, int]],
        encoded: Sequence[bytes],
        image_verdicts: Sequence[Verdict | None],
        notes: Sequence[Sequence[str]],
        screened: bool,
    ) -> tuple[list[dict[str, Any]], int]:
        by_owner = {owner: i for i, owner in enumerate(owners)}
        records: list[dict[str, Any]] = []
        blocked = 0
        for row, pverdict in zip(rows, prompt_verdicts, strict=True):
            warnings = self._row_warnings(row)
            for k, seed in enumerate(row.seeds):
                record: dict[str, Any] = {
                    "prompt": row.prompt,
                    "generated_image": "",
                    "nsfw_content_detected": None,
                    "seed": seed,
                    "index": row.index,
                }
                verdict = pverdict
                if pverdict is None or not pverdict.blocked:
                    i = by_owner[(row.position, k)]
                    verdict = image_verdicts[i]
                    if verdict is not None and verdict.blocked:
                        self._count_blocked(verdict)
                    else:
                        record["generated_image"] = to_base64(encoded[i])
                    extra = list(notes[i]) if i < len(notes) else []
                else:
                    extra = []
                if verdict is not None and verdict.blocked:
                    record["nsfw_content_detected"] = True
                    record["blocked"] = verdict.as_record()
                    blocked += 1
                elif screened:
                    record["nsfw_content_detected"] = False
                if warnings or extra:
                    record["warnings"] = warnings + extra
                records.append(record)
        return records, blocked

    def _row_warnings(self, row: RowRequest) -> list[str]:
        out = []
        if self.backend.prompt_overflows(row.prompt):
            out.append("prompt is longer than the text encoder's 77-token window; only its first 77 tokens were used")
        if row.negative_prompt and self.backend.prompt_overflows(row.negative_prompt):
            out.append("negative_prompt is longer than the 77-token window; only its first 77 tokens were used")
        return out
