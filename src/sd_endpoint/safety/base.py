"""The content-screening hook the service calls: prompts (and input images) before generation, images after."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Stage = Literal["prompt", "input_image", "image"]  # "input_image": image-to-image/inpainting input


@dataclass(frozen=True)
class Verdict:
    """The screening result for one prompt (with its negative prompt) or one image."""

    stage: Stage
    blocked: bool
    # Every analysed category with its severity, e.g. {"Hate": 0, "Violence": 4}.
    severities: dict[str, int] = field(default_factory=dict)
    # The categories at or above their threshold (the reason for a block).
    blocked_categories: dict[str, int] = field(default_factory=dict)
    blocklist_hits: tuple[str, ...] = ()

    def as_record(self) -> dict[str, object]:
        """The ``blocked`` object of a response record."""
        out: dict[str, object] = {"stage": self.stage, "categories": dict(self.blocked_categories)}
        if self.blocklist_hits:
            out["blocklists"] = list(self.blocklist_hits)
        return out


class Screener(Protocol):
    """Screens text and images. Raises ``ScreeningUnavailable`` when the service cannot answer."""

    enabled: bool

    def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
        """One verdict per (prompt, negative_prompt) pair, in order."""
        ...

    def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
        """One verdict per encoded image (PNG/JPEG/WebP bytes, as returned to the user), in order."""
        ...

    def close(self) -> None: ...


class NullScreener:
    """No screening configured: nothing is screened and records say ``nsfw_content_detected: null``."""

    enabled = False

    def screen_prompts(self, prompts: Sequence[tuple[str, str | None]]) -> list[Verdict]:
        raise RuntimeError("NullScreener does not screen; check `enabled` first")

    def screen_images(self, images: Sequence[bytes]) -> list[Verdict]:
        raise RuntimeError("NullScreener does not screen; check `enabled` first")

    def close(self) -> None:
        pass
