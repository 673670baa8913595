"""Generated images kept in memory for a bounded time, for OpenAI's ``response_format: "url"``.

Only used when ``SD_ENDPOINT_OPENAI_IMAGE_BASE_URL`` is set. Each image gets an unguessable id (the URL is
the capability, as OpenAI's signed URLs are: no key is needed to download it), lives for
``SD_ENDPOINT_OPENAI_IMAGE_TTL_S``, and the store never holds more than ``SD_ENDPOINT_OPENAI_IMAGE_STORE_BYTES``:
past that the oldest images go first. Touched only from the event loop, so it needs no lock.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float  # on the store's clock


class ImageStore:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()  # oldest first (one TTL: also soonest to expire)
        self.bytes = 0

    def put(self, data: bytes, media_type: str) -> str | None:
        """Keep ``data``; its id, or None when it alone is larger than the whole store."""
        if len(data) > self.max_bytes:
            return None
        now = self._clock()
        self._expire(now)
        while self._images and self.bytes + len(data) > self.max_bytes:
            self._drop(next(iter(self._images)))
        image_id = secrets.token_urlsafe(24)
        self._images[image_id] = StoredImage(data, media_type, now + self.ttl_s)
        self.bytes += len(data)
        return image_id

    def get(self, image_id: str) -> StoredImage | None:
        self._expire(self._clock())
        return self._images.get(image_id)

    def __len__(self) -> int:
        return len(self._images)

    def _expire(self, now: float) -> None:
        while self._images:
            oldest, image = next(iter(self._images.items()))
            if image.expires > now:
                return
            self._drop(oldest)

    def _drop(self, image_id: str) -> None:
        self.bytes -= len(self._images.pop(image_id).data)
