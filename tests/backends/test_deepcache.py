"""DeepCache: the shallow step is exact given the deep features, full steps run on schedule, requests with
DeepCache stay out of other requests' batches and off the captured DeepSpeed path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sd_endpoint.backends.deepcache import DeepCacheUNet
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.backends.routing import RoutingBackend
from sd_endpoint.errors import InvalidRequest
from sd_endpoint.jobs import GenerationSpec, ImageTask
from sd_endpoint.request_parsing import parse_request
from tests.support.fakes import FakeDeepSpeed


def unet_inputs(unet: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 32, 32, generator=gen)
    context = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=gen)
    return sample, torch.tensor(500), context


def test_shallow_step_reproduces_the_full_unet_from_the_same_deep_features(backend: DiffusersBackend) -> None:
    unet = backend.raw_unet
    sample, t, context = unet_inputs(unet)
    cached = DeepCacheUNet(unet, 3)
    with torch.inference_mode():
        full = cached(sample, t, context, return_dict=False)[0]
        assert torch.equal(full, unet(sample, t, context, return_dict=False)[0])
        # Same inputs, so the kept deep features are exactly this step's: the shallow path must agree.
        shallow = cached(sample, t, context, return_dict=False)[0]
    assert cached.full_calls == 1 and cached.calls == 2
    assert torch.allclose(shallow, full, rtol=1e-5, atol=1e-6)


def test_full_steps_run_every_interval(backend: DiffusersBackend) -> None:
    unet = backend.raw_unet
    cached = DeepCacheUNet(unet, 3)
    with torch.inference_mode():
        for step in range(7):
            cached(*unet_inputs(unet, step), return_dict=False)
    assert cached.full_calls == 3  # steps 0, 3, 6


def test_generation_with_cache_is_close_to_and_cheaper_than_without(backend: DiffusersBackend) -> None:
    tasks = [ImageTask("a red fox in the snow", None, 7)]
    plain = backend.generate(GenerationSpec(64, 64, 6, 7.5, "ddim"), tasks)
    cached = backend.generate(GenerationSpec(64, 64, 6, 7.5, "ddim", cache_interval=2), tasks)
    a, b = (np.asarray(r.images[0], dtype=np.float64) for r in (plain, cached))
    assert cached.steps_done == 6
    assert not np.array_equal(a, b)  # the cache changed the computation ...
    assert np.abs(a - b).mean() < 20  # ... but not the image beyond recognition (random tiny weights)


def test_cache_interval_is_validated_and_part_of_the_spec() -> None:
    from sd_endpoint.contract import Limits

    limits = Limits(default_height=64, default_width=64)
    body: dict[str, Any] = {"input_data": {"columns": ["prompt"], "data": ["x"]}, "parameters": {"cache_interval": 3}}
    assert parse_request(body, limits).spec.cache_interval == 3
    body["parameters"] = {}
    assert parse_request(body, limits).spec.cache_interval == 1
    for bad in (0, 11):
        body["parameters"] = {"cache_interval": bad}
        with pytest.raises(InvalidRequest, match="cache_interval"):
            parse_request(body, limits)
    assert GenerationSpec(64, 64, 5, 7.5, "ddim", cache_interval=2) != GenerationSpec(
        64, 64, 5, 7.5, "ddim", cache_interval=3
    )


def test_deepcache_requests_bypass_the_captured_path(backend: DiffusersBackend) -> None:
    fake = FakeDeepSpeed(backend, [(64, 64, 1)])
    router = RoutingBackend(fake, backend, "test")
    tasks = [ImageTask("x", None, 1)]
    router.generate(GenerationSpec(64, 64, 2, 7.5, "ddim", cache_interval=2), tasks)
    assert fake.batches == [] and router.routed["diffusers"] == 1
    router.generate(GenerationSpec(64, 64, 2, 7.5, "ddim"), tasks)
    assert fake.batches == [1]
