"""Fitting text and images into what Azure AI Content Safety accepts."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from sd_endpoint.safety.preprocess import (
    CHUNK_OVERLAP_CHARS,
    MAX_IMAGE_SIDE,
    MAX_TEXT_CHARS,
    MIN_IMAGE_SIDE,
    TARGET_IMAGE_BYTES,
    chunk_text,
    image_size,
    prepare_image,
)
from tests.safety.conftest import png


def words(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    length = 0
    while length < n_chars:
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9)))
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:n_chars]


def noise_png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.parametrize("length", [0, 1, MAX_TEXT_CHARS])
def test_text_within_the_limit_is_one_chunk(length: int) -> None:
    text = words(length)
    assert chunk_text(text) == [text]


@pytest.mark.parametrize("length", [MAX_TEXT_CHARS + 1, 15_000, 20_000, 45_678])
def test_long_text_chunks_fit_and_cover_everything(length: int) -> None:
    text = words(length, seed=length)
    chunks = chunk_text(text)
    assert len(chunks) >= 2
    assert all(0 < len(c) <= MAX_TEXT_CHARS for c in chunks)
    # Each chunk is a slice of the text, in order, and together they cover every character.
    pos = 0
    for chunk in chunks:
        start = text.find(chunk, max(0, pos - CHUNK_OVERLAP_CHARS * 2))
        assert 0 <= start <= pos, "a gap between chunks"
        pos = start + len(chunk)
    assert pos == len(text)


def test_cuts_fall_between_words_and_a_phrase_across_a_cut_is_seen_whole() -> None:
    text = words(30_000, seed=3)
    chunks = chunk_text(text)
    for chunk in chunks[:-1]:
        assert text[text.find(chunk) + len(chunk) - 1].isspace()  # each cut is right after a space
    # Every 40-character window of the text lies whole inside at least one chunk.
    for start in range(0, len(text) - 40, 997):
        window = text[start : start + 40]
        assert any(window in chunk for chunk in chunks)


def test_text_without_spaces_is_cut_hard() -> None:
    text = "x" * 25_000
    chunks = chunk_text(text)
    assert all(len(c) <= MAX_TEXT_CHARS for c in chunks)
    assert sum(len(c) for c in chunks) >= len(text)


def test_image_within_limits_is_sent_as_is() -> None:
    data = png((10, 20, 30), (768, 768))
    prepared = prepare_image(data)
    assert prepared.data is data and not prepared.changed


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((4096, 64), (2048, 50)),  # downscaled to 2048 wide; 32 high would be too small: padded to 50
        ((2056, 512), (2048, 510)),
        ((512, 3000), (349, 2048)),
        ((40, 40), (50, 50)),  # too small: upscaled
        ((30, 120), (50, 200)),
    ],
)
def test_images_outside_the_side_limits_are_resized(size: tuple[int, int], expected: tuple[int, int]) -> None:
    data = png((200, 40, 40), size)
    prepared = prepare_image(data)
    assert prepared.changed and prepared.action == "resized"
    assert (prepared.original_width, prepared.original_height) == size
    assert (prepared.width, prepared.height) == expected == image_size(prepared.data)
    assert MIN_IMAGE_SIDE <= min(expected) and max(expected) <= MAX_IMAGE_SIDE


def test_image_over_the_byte_limit_is_re_encoded_smaller() -> None:
    data = noise_png(1400, 1400)  # random pixels: PNG cannot compress them under 4 MB
    assert len(data) > TARGET_IMAGE_BYTES
    prepared = prepare_image(data)
    assert prepared.changed and len(prepared.data) <= TARGET_IMAGE_BYTES
    with Image.open(io.BytesIO(prepared.data)) as im:
        assert im.format == "JPEG" and im.size == (1400, 1400)


def test_byte_limit_shrinks_the_image_when_re_encoding_is_not_enough() -> None:
    data = noise_png(600, 600)
    prepared = prepare_image(data, max_bytes=60_000)
    assert len(prepared.data) <= 60_000 and prepared.action == "resized"
    assert prepared.width < 600 and prepared.width == prepared.height


def test_undecodable_bytes_are_an_error() -> None:
    with pytest.raises(ValueError, match="not a decodable image"):
        prepare_image(b"definitely not an image")
