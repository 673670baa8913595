"""What Azure AI Content Safety (API 2023-10-01) accepts, and how we fit text and images into it.

The screener must never send something the service refuses. The AACS emulator (``aacs_emulator.limits``)
states the same limits on its own, as the service's stand-in; a test checks that the two agree. PIL is
imported lazily so the CLI stays fast.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

API_VERSION = "2023-10-01"
CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
OUTPUT_TYPES = ("FourSeverityLevels", "EightSeverityLevels")

# Text: at most 10,000 Unicode code points per call (Python's len() counts code points).
MAX_TEXT_CHARS = 10_000
# When a long text is cut, the next chunk repeats up to this many characters before the cut, so a phrase
# (or blocklist term) that straddles the cut is still seen whole by one call.
CHUNK_OVERLAP_CHARS = 200
# Images: 4 MB, sides from 50 to 2048 pixels (the 2023-10-01 API; later versions allow more).
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_SIDE = 2048
MIN_IMAGE_SIDE = 50
# The screener aims below the byte limit so that "4 MB" read as 4,000,000 bytes is also respected.
TARGET_IMAGE_BYTES = 4_000_000


def chunk_text(text: str, limit: int = MAX_TEXT_CHARS, overlap: int = CHUNK_OVERLAP_CHARS) -> list[str]:
    """Split ``text`` into pieces of at most ``limit`` code points that together cover all of it.

    Cuts fall on whitespace when there is some in the last quarter of a window (so words are not split),
    and each chunk after the first starts ``overlap`` characters before the previous cut (at a word start).
    """
    if limit <= 0 or overlap < 0 or overlap >= limit // 2:
        raise ValueError("need limit > 0 and 0 <= overlap < limit / 2")
    if len(text) <= limit:
        return [text]
    chunks: list[str] = []
    start = 0
    while True:
        end = start + limit
        if end >= len(text):
            chunks.append(text[start:])
            return chunks
        cut = _last_space(text, end - limit // 4, end)
        chunks.append(text[start:cut])
        nxt = cut - overlap
        if overlap:
            # Begin the overlap at a word start, but never so far back that no progress is made.
            space = _last_space(text, nxt - overlap // 2, nxt)
            nxt = space if space > start else nxt
        start = max(nxt, start + 1)


def _last_space(text: str, lo: int, hi: int) -> int:
    """The index just after the last whitespace in text[lo:hi], or ``hi`` when there is none."""
    for i in range(hi - 1, max(lo, 0) - 1, -1):
        if text[i].isspace():
            return i + 1
    return hi


@dataclass(frozen=True)
class PreparedImage:
    """The bytes to send for screening, and what was done to fit the service's limits."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    action: str  # "as-is", "resized", "re-encoded"

    @property
    def changed(self) -> bool:
        return self.action != "as-is"


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image; raises ValueError when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a decodable image ({exc})") from None


def prepare_image(data: bytes, *, max_bytes: int = TARGET_IMAGE_BYTES) -> PreparedImage:
    """``data`` itself when the service accepts it; otherwise a resized and/or re-encoded copy that it does.

    The copy keeps the aspect ratio: downscaled to fit 2048x2048, or upscaled so both sides reach 50. An
    image too elongated for both is downscaled and padded (black) to 50 on its short side. The copy is PNG,
    or JPEG (quality 90, then smaller) when a PNG would be over the byte limit.
    """
    from PIL import Image

    width, height = image_size(data)
    fits = MIN_IMAGE_SIDE <= min(width, height) and max(width, height) <= MAX_IMAGE_SIDE
    if fits and len(data) <= max_bytes:
        return PreparedImage(data, width, height, width, height, "as-is")

    with Image.open(io.BytesIO(data)) as src:
        image = src.convert("RGB")
    action = "re-encoded"
    if not fits:
        image = _fit_sides(image)
        action = "resized"
    out = _encode(image, "PNG")
    while len(out) > max_bytes:
        out = _encode(image, "JPEG")
        if len(out) <= max_bytes:
            break
        # Still too big: shrink by the byte ratio (with a margin) and try again.
        scale = (max_bytes / len(out)) ** 0.5 * 0.9
        new = (max(MIN_IMAGE_SIDE, int(image.width * scale)), max(MIN_IMAGE_SIDE, int(image.height * scale)))
        if new == image.size:  # cannot shrink further; let the service say no
            break
        image = image.resize(new, Image.Resampling.LANCZOS)
        action = "resized"
    return PreparedImage(out, image.width, image.height, width, height, action)


def _fit_sides(image: Image.Image) -> Image.Image:
    from PIL import Image

    w, h = image.size
    down = min(1.0, MAX_IMAGE_SIDE / w, MAX_IMAGE_SIDE / h)
    up = max(1.0, MIN_IMAGE_SIDE / w, MIN_IMAGE_SIDE / h)
    scale = down if down < 1.0 else up
    # Round towards the limits: never above 2048 when shrinking, never below 50 when growing.
    size = (_scaled(w, scale), _scaled(h, scale))
    image = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    if min(image.size) < MIN_IMAGE_SIDE:
        padded = Image.new("RGB", (max(image.width, MIN_IMAGE_SIDE), max(image.height, MIN_IMAGE_SIDE)))
        padded.paste(image, ((padded.width - image.width) // 2, (padded.height - image.height) // 2))
        image = padded
    return image


def _scaled(side: int, scale: float) -> int:
    if scale < 1:
        return max(1, min(MAX_IMAGE_SIDE, int(side * scale)))
    return max(MIN_IMAGE_SIDE, -(-int(side * scale * 1000) // 1000))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
