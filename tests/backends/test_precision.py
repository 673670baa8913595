"""SD_ENDPOINT_PRECISION=fp8: refused without fp8 tensor cores, and the conversion picks the right layers."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from sd_endpoint.backends import precision
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.errors import ConfigError


def test_fp8_is_refused_on_cpu_with_a_clear_message(backend: DiffusersBackend) -> None:
    with pytest.raises(ConfigError, match=r"SD_ENDPOINT_PRECISION=fp8 needs a CUDA GPU with fp8 tensor cores"):
        precision.to_fp8(backend.raw_unet)


@pytest.mark.parametrize(("capability", "name", "refused"), [((8, 0), "NVIDIA A100", True), ((9, 0), "H200", False)])
def test_fp8_needs_compute_capability_8_9(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str, refused: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    reason = precision.fp8_blocker(torch.device("cuda", 0))
    assert (reason is not None) is refused
    if refused:
        assert "A100 (compute capability 8.0) has no fp8 tensor cores" in str(reason)


def test_fp8_conversion_of_the_unet_linear_layers(monkeypatch: pytest.MonkeyPatch, backend: DiffusersBackend) -> None:
    # torchao refuses fp8 without the hardware; its check is bypassed here to test what we convert and
    # that the converted UNet still computes nearly the same (its fallback matmul runs on the CPU).
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    unet = copy.deepcopy(backend.raw_unet).to(torch.bfloat16)
    want = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and precision.fp8_layer(m, n)]
    assert want and not any(n.startswith("time_embedding") for n in want)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=gen).to(torch.bfloat16)
    context = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        before = unet(sample, 500, context, return_dict=False)[0].float()
    assert precision.convert(unet) == len(want)
    kinds: dict[str, Any] = {
        n: type(m.weight).__name__ for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert {n for n, k in kinds.items() if k == "Float8Tensor"} == set(want)
    with torch.inference_mode():
        after = unet(sample, 500, context, return_dict=False)[0].float()
    assert 0 < float((after - before).norm() / before.norm()) < 0.2
