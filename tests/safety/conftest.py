"""Fixtures for content-safety tests: the AACS emulator on loopback and screeners built on the real SDK."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from aacs_emulator import AacsEmulator
from sd_endpoint.safety.aacs import AzureContentSafetyScreener
from sd_endpoint.settings import ContentSafetySettings

KEY = "test-key-0123456789"

# Made-up words, so the verdicts depend on nothing but this policy.
POLICY: dict[str, Any] = {
    "text": {
        "terms": [
            {"term": "grumblewick", "category": "Hate", "severity": 2},
            {"term": "hexathorn", "category": "Hate", "severity": 4},
            {"term": "sorrowvine", "category": "SelfHarm", "severity": 4},
            {"term": "velvetine", "category": "Sexual", "severity": 4},
            {"term": "crashmaul", "category": "Violence", "severity": 4},
            {"term": "bruiseling", "category": "Violence", "severity": 3},
            {"term": "ironfang", "category": "Violence", "severity": 6},
        ]
    },
    "blocklists": {"house-rules": ["quux phrase", "zeblor"]},
    "image": {"rules": []},
}


def png(color: tuple[int, int, int] | str, size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def emulator() -> Iterator[AacsEmulator]:
    with AacsEmulator(POLICY, key=KEY) as emu:
        yield emu


ScreenerFactory = Callable[..., AzureContentSafetyScreener]


@pytest.fixture
def make_screener(emulator: AacsEmulator) -> Iterator[ScreenerFactory]:
    """Build screeners with ``from_settings`` (no retries unless asked); all are closed afterwards."""
    made: list[AzureContentSafetyScreener] = []

    def make(*, credential: Any = None, **overrides: Any) -> AzureContentSafetyScreener:
        values: dict[str, Any] = {"endpoint": emulator.url, "key": KEY, "retries": 0, "timeout_s": 5.0}
        values.update(overrides)
        screener = AzureContentSafetyScreener.from_settings(ContentSafetySettings(**values), credential=credential)
        made.append(screener)
        return screener

    yield make
    for screener in made:
        screener.close()
