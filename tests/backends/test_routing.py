"""Shape routing: the DeepSpeed path serves only what it captured; everything else goes to diffusers."""

from __future__ import annotations

import numpy as np
import pytest

from sd_endpoint.backends.deepspeed_backend import captured_batch_sizes
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.backends.routing import RoutingBackend, split_batch
from sd_endpoint.jobs import GenerationSpec, ImageTask
from tests.support.fakes import FakeDeepSpeed

SPEC = GenerationSpec(64, 64, 2, 7.5, "ddim", 0.0)


@pytest.mark.parametrize(
    ("n", "sizes", "chunks", "left"),
    [
        (1, [1], [1], 0),
        (3, [2, 1], [2, 1], 0),
        (7, [4, 2], [4, 2], 1),
        (4, [1], [1, 1, 1, 1], 0),
        (3, [4], [], 3),
        (5, [], [], 5),
    ],
)
def test_split_batch_uses_captured_sizes_largest_first(n: int, sizes: list[int], chunks: list[int], left: int) -> None:
    assert split_batch(n, sizes) == (chunks, left)


def test_captured_batch_sizes_match_size_and_guidance() -> None:
    shapes = [(768, 768, 1), (768, 768, 4), (512, 768, 2)]
    assert captured_batch_sizes(shapes, GenerationSpec(768, 768, 50, 7.5, "ddim")) == [4, 1]
    assert captured_batch_sizes(shapes, GenerationSpec(512, 768, 50, 7.5, "ddim")) == [2]
    assert captured_batch_sizes(shapes, GenerationSpec(768, 512, 50, 7.5, "ddim")) == []  # height/width order
    # Without guidance the UNet sees one row per image: a graph for b guided images serves 2b unguided.
    assert captured_batch_sizes(shapes, GenerationSpec(768, 768, 50, 1.0, "ddim")) == [8, 2]


def tasks(n: int) -> list[ImageTask]:
    return [ImageTask(f"prompt {i}", None, 100 + i) for i in range(n)]


@pytest.fixture
def router(backend: DiffusersBackend) -> RoutingBackend:
    return RoutingBackend(FakeDeepSpeed(backend, [(64, 64, 2)]), backend, "test")


def test_captured_shape_goes_to_the_fast_path(router: RoutingBackend) -> None:
    result = router.generate(SPEC, tasks(2))
    assert router.fast.batches == [2]  # type: ignore[attr-defined]
    assert all("fake deepspeed" in n for n in result.notes)
    assert router.routed == {"deepspeed": 2, "diffusers": 0}


def test_other_sizes_go_to_the_diffusers_path(router: RoutingBackend) -> None:
    result = router.generate(GenerationSpec(72, 64, 2, 7.5, "ddim", 0.0), tasks(2))
    assert router.fast.batches == []  # type: ignore[attr-defined]
    assert len(result.images) == 2 and result.images[0].size == (64, 72)
    assert all("fake deepspeed" not in n for n in result.notes)
    assert router.supports(GenerationSpec(72, 64, 2, 7.5, "ddim", 0.0))


def test_uncapturable_remainder_goes_to_diffusers_in_task_order(
    router: RoutingBackend, backend: DiffusersBackend
) -> None:
    steps: list[tuple[int, int]] = []
    result = router.generate(SPEC, tasks(5), on_step=lambda i, total: steps.append((i, total)))
    assert router.fast.batches == [2, 2]  # type: ignore[attr-defined]
    assert router.routed == {"deepspeed": 4, "diffusers": 1}
    assert ["fake deepspeed" in n for n in result.notes] == [True, True, True, True, False]
    # Each image is the one its own seed gives, wherever it ran.
    alone = backend.generate(SPEC, tasks(5)[4:])
    assert np.array_equal(np.asarray(result.images[4]), np.asarray(alone.images[0]))
    # Progress counts across the three runs (2 steps each) without going back.
    assert [i for i, _ in steps] == [1, 2, 3, 4, 5, 6] and {t for _, t in steps} == {6}
