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
from typing import TYPE_CHECKING, Any

from sd_endpoint import metrics
from sd_endpoint.backends.base import Backend
from sd_endpoint.contract import Limits, RowRequest, ScoringRequest
from sd_endpoint.errors import ScreeningUnavailable
from sd_endpoint.imaging import encode_image, to_base64
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.request_parsing import decode_body, parse_request
from sd_endpoint.safety.base import NullScreener, Screener, Verdict
from sd_endpoint.settings import ContentSafetySettings, Settings

if TYPE_CHECKING:
    from PIL import Image

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

    def health_check(self) -> None:
        """One tiny tensor op on the model's device (a wedged or lost GPU raises or hangs here)."""
        import torch

        device = str(self.backend.describe().get("device", "cpu"))
        value = (torch.ones(1, device=device) + 1).sum().item()
        if value != 2.0:
            raise RuntimeError(f"1 + 1 gave {value} on {device}")

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

    def begin(self, request: ScoringRequest) -> Scoring:
        """The request's stages, for a caller that runs them itself (the server awaits each one)."""
        return Scoring(self, request)

    def score(
        self,
        request: ScoringRequest,
        cancel: CancelToken | None = None,
        generate: GenerateFn | None = None,
    ) -> ScoreResult:
        """Run one validated request, blocking (score.py, the batch path, the CLI)."""
        cancel = cancel or self.new_cancel_token()
        generate = generate or self.backend.generate
        scoring = self.begin(request)
        # 1. Screen the prompts: a blocked row gets no image.
        scoring.screen_prompts()
        # 2. Generate the images of the rows that passed.
        tasks = scoring.tasks()
        if tasks:
            started = time.perf_counter()
            result = generate(request.spec, tasks, cancel)
            scoring.take(result, generate_s=time.perf_counter() - started)
        # 3. Encode them in the requested format.
        scoring.encode()
        # 4. Screen the encoded images.
        scoring.screen_images()
        # 5. One record per requested image.
        return scoring.result()

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

    def _row_warnings(self, row: RowRequest) -> list[str]:
        out = []
        if self.backend.prompt_overflows(row.prompt):
            out.append("prompt is longer than the text encoder's 77-token window; only its first 77 tokens were used")
        if row.negative_prompt and self.backend.prompt_overflows(row.negative_prompt):
            out.append("negative_prompt is longer than the 77-token window; only its first 77 tokens were used")
        return out


@dataclass
class _Image:
    """One requested image: the row it answers and what each stage made of it (the row-to-image mapping)."""

    row: RowRequest
    seed: int
    prompt_verdict: Verdict | None = None  # the row's: every image of a row shares it
    picture: Image.Image | None = None  # generated, until encoded
    encoded: bytes | None = None
    image_verdict: Verdict | None = None
    notes: tuple[str, ...] = ()

    @property
    def wanted(self) -> bool:
        """Generated unless screening blocked its prompt."""
        return not (self.prompt_verdict is not None and self.prompt_verdict.blocked)

    @property
    def verdict(self) -> Verdict | None:
        """Why it is withheld, if it is: the prompt's verdict first, else the image's."""
        return self.prompt_verdict if not self.wanted else self.image_verdict


class Scoring:
    """One request through the stages, in order: screen_prompts, tasks/take, encode, screen_images, result.

    Each stage is a blocking call that fills in ``images`` and its entry of ``timings``; the blocking
    ``GenerationService.score`` runs them in a row, the server awaits them one by one.
    """

    def __init__(self, service: GenerationService, request: ScoringRequest) -> None:
        self.service = service
        self.request = request
        self.images = [_Image(row, seed) for row in request.rows for seed in row.seeds]
        self.timings: dict[str, float] = {}
        self.screening = service.screener.enabled
        self.skipped = False  # screening failed open
        self.steps = 0

    @property
    def spec(self) -> GenerationSpec:
        return self.request.spec

    def screen_prompts(self) -> None:
        if not self.screening:
            return
        started = time.perf_counter()
        rows = self.request.rows
        verdicts: list[Verdict | None] = [None] * len(rows)
        try:
            verdicts = list(self.service.screener.screen_prompts([(r.prompt, r.negative_prompt) for r in rows]))
        except ScreeningUnavailable as exc:
            self.skipped = self.service._fail_open_or_raise(exc)
        self._timed("screen_prompt", started)
        metrics.SCREENING_SECONDS.labels("prompt").observe(self.timings["screen_prompt"])
        # A blocked input image blocks its row from here on, as a blocked prompt does.
        if not self.skipped and self.spec.task != "text-to-image":
            started = time.perf_counter()
            try:
                verdicts = self.service._screen_inputs(rows, verdicts)
            except ScreeningUnavailable as exc:
                self.skipped = self.service._fail_open_or_raise(exc)
            self._timed("screen_input_image", started)
            metrics.SCREENING_SECONDS.labels("input_image").observe(self.timings["screen_input_image"])
        by_row = dict(zip((r.position for r in rows), verdicts, strict=True))
        for verdict in verdicts:
            if verdict is not None and verdict.blocked:
                self.service._count_blocked(verdict)
        for image in self.images:
            image.prompt_verdict = by_row[image.row.position]

    def tasks(self) -> list[ImageTask]:
        """What to generate, in order: one task per wanted image."""
        return [
            ImageTask(i.row.prompt, i.row.negative_prompt, i.seed, i.row.image, i.row.mask)
            for i in self.images
            if i.wanted
        ]

    def take(self, result: BatchResult, *, generate_s: float) -> None:
        """The backend's images (in ``tasks()`` order) and how long the pipeline call took."""
        wanted = [i for i in self.images if i.wanted]
        result.expect(len(wanted))
        notes = result.notes or [[] for _ in wanted]
        for image, picture, extra in zip(wanted, result.images, notes, strict=True):
            image.picture = picture
            image.notes = tuple(extra)
        self.steps = result.steps_done
        self.timings["generate"] = generate_s

    def encode(self) -> None:
        started = time.perf_counter()
        made = [i for i in self.images if i.picture is not None]
        fmt = self.request.output_format
        encoded = self.service._encoder.map(lambda im: encode_image(im, fmt), [i.picture for i in made])
        for image, data in zip(made, encoded, strict=True):
            image.encoded, image.picture = data, None
        self._timed("encode", started)
        metrics.ENCODE_SECONDS.observe(self.timings["encode"])

    def screen_images(self) -> None:
        made = [i for i in self.images if i.encoded]
        if not self.screening or self.skipped or not made:
            return
        started = time.perf_counter()
        try:
            verdicts = self.service.screener.screen_images([i.encoded or b"" for i in made])
        except ScreeningUnavailable as exc:
            self.skipped = self.service._fail_open_or_raise(exc)
        else:
            for image, verdict in zip(made, verdicts, strict=True):
                image.image_verdict = verdict
                if verdict.blocked:
                    self.service._count_blocked(verdict)
        self._timed("screen_image", started)
        metrics.SCREENING_SECONDS.labels("image").observe(self.timings["screen_image"])

    def result(self) -> ScoreResult:
        screened = self.screening and not self.skipped
        headers = {SAFETY_HEADER: "skipped" if self.skipped else "screened"} if self.screening else {}
        warnings: dict[int, list[str]] = {}
        records: list[dict[str, Any]] = []
        blocked = 0
        for image in self.images:
            row = image.row
            if row.position not in warnings:
                warnings[row.position] = self.service._row_warnings(row)
            record: dict[str, Any] = {
                "prompt": row.prompt,
                "generated_image": "",
                "nsfw_content_detected": None,
                "seed": image.seed,
                "index": row.index,
            }
            verdict = image.verdict
            if verdict is not None and verdict.blocked:
                record["nsfw_content_detected"] = True
                record["blocked"] = verdict.as_record()
                blocked += 1
            else:
                record["generated_image"] = to_base64(image.encoded or b"")
                if screened:
                    record["nsfw_content_detected"] = False
            extra = warnings[row.position] + list(image.notes)
            if extra:
                record["warnings"] = extra
            records.append(record)
        generated = sum(1 for i in self.images if i.encoded is not None)
        return ScoreResult(records, headers, dict(self.timings), generated, self.steps, blocked)

    def _timed(self, stage: str, started: float) -> None:
        self.timings[stage] = time.perf_counter() - started
