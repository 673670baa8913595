"""The per-layer check and the token plan, on CPU, with DeepSpeed's real Triton kernel as the injected fault.

The tiny model's attention sits at latents / 4: 12x12 = 144 tokens at 384x384 (the count SD 2.1's middle
block has at 768x768), 8x8 = 64 at 256x256. Its self-attentions are replaced by ones that run DeepSpeed's
kernel in Triton's interpreter, as the DeepSpeed path would without its guard.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from sd_endpoint.backends.checks import capture_block_inputs, layer_check, one_shape_per_resolution
from sd_endpoint.backends.deepspeed_attention import ExactGuard, token_plan
from sd_endpoint.backends.deepspeed_backend import shared_copy
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from tests.backends import ds_triton

SHAPES = [(384, 384, 1), (256, 256, 1)]


class KernelAttention(torch.nn.Module):
    """diffusers' self-attention with DeepSpeed's Triton kernel (its launch, no guard) in the middle."""

    def __init__(self, attn: Any) -> None:
        super().__init__()
        self.attn = attn
        self.calls: list[int] = []

    def forward(self, hidden: Any, context: Any = None, input_mask: Any = None, **_: Any) -> Any:
        a = self.attn
        b, n, _ = hidden.shape
        heads = a.heads

        def split(x: Any) -> Any:
            return x.view(b, n, heads, -1).transpose(1, 2).contiguous()

        q, k, v = split(a.to_q(hidden)), split(a.to_k(hidden)), split(a.to_v(hidden))
        out, _ = ds_triton.launch(q, k, v, q.shape[-1] ** -0.5)
        self.calls.append(n)
        return a.to_out[0](out.to(hidden.dtype).transpose(1, 2).reshape(b, n, -1))


def injected(unet: Any, guarded: bool) -> Any:
    from sd_endpoint.backends.checks import transformer_blocks

    copy = shared_copy(unet)
    for block in transformer_blocks(copy).values():
        kernel = KernelAttention(block.attn1)
        block.attn1 = ExactGuard(kernel, block.attn1) if guarded else kernel
    return copy


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_layer_check_rejects_the_144_token_kernel_fault_and_passes_the_guarded_path(
    backend: DiffusersBackend,
) -> None:
    unet = backend.raw_unet
    faulty = layer_check(unet, injected(unet, guarded=False), SHAPES)
    assert not faulty.passed
    failed = {(e.shape, e.tokens) for e in faulty.failures}
    assert failed == {((384, 384, 1), 144)}  # every block at 144 tokens, none at 64
    assert all(e.relative_error < 1e-2 for e in faulty.errors if e.tokens == 64)
    assert "144 tokens" in faulty.describe()

    guarded = layer_check(unet, injected(unet, guarded=True), SHAPES)
    assert guarded.passed, guarded.describe()
    assert len(guarded.errors) == 2 * 4  # 4 transformer blocks (1 down, 1 mid, 2 up) at each of 2 shapes


def test_layer_check_fails_on_a_wrong_block_and_on_nan(backend: DiffusersBackend) -> None:
    unet = backend.raw_unet
    copy = shared_copy(unet)
    from sd_endpoint.backends.checks import transformer_blocks

    name, block = next(iter(transformer_blocks(copy).items()))

    class Scaled(torch.nn.Module):
        def __init__(self, inner: Any, scale: float) -> None:
            super().__init__()
            self.inner, self.scale = inner, scale

        def forward(self, hidden: Any, **kwargs: Any) -> Any:
            return hidden + (self.inner(hidden, **kwargs) - hidden) * self.scale

    parent, _, attr = name.rpartition(".")
    setattr(copy.get_submodule(parent), attr, Scaled(block, 1.02))  # a 2% error in the block's update
    check = layer_check(unet, copy, [(256, 256, 1)])
    assert not check.passed and check.failures[0].relative_error == pytest.approx(0.02, rel=1e-3)
    setattr(copy.get_submodule(parent), attr, Scaled(block, 1.005))  # within fp16-like tolerance
    assert layer_check(unet, copy, [(256, 256, 1)]).passed
    setattr(copy.get_submodule(parent), attr, Scaled(block, float("nan")))
    assert not layer_check(unet, copy, [(256, 256, 1)]).passed


def test_token_plan_matches_the_hidden_states_the_blocks_receive(backend: DiffusersBackend) -> None:
    unet = backend.raw_unet
    shapes = [(384, 384, 1), (256, 256, 2), (200, 136, 1)]  # 136/8 = 17: odd sizes round up when halved
    captured = capture_block_inputs(unet, shapes)
    plan = {(p.block, p.shape): p.tokens for p in token_plan(unet, shapes)}
    assert plan == {key: int(hidden.shape[1]) for key, (hidden, _) in captured.items()}


def test_sd21_token_counts_at_768_include_the_144_token_mid_block() -> None:
    from pathlib import Path

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from sd_endpoint.model.demo import __file__ as demo_file  # the packaged SD 2.1 configs sit beside it

    config = json.loads((Path(demo_file).parent / "sd21_config" / "unet" / "config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    plan = token_plan(unet, [(768, 768, 1), (512, 512, 1)])
    at768 = {
        p.block.split(".")[0] + ("" if p.block.startswith("mid") else p.block.split(".")[1]): p.tokens
        for p in plan
        if p.shape[0] == 768
    }
    assert at768["mid_block"] == 144 and at768["down_blocks0"] == 9216 and at768["up_blocks3"] == 9216
    assert sorted({p.tokens for p in plan if p.shape[0] == 768}) == [144, 576, 2304, 9216]
    assert [p.block for p in plan if not p.on_kernel] == ["mid_block.attentions.0.transformer_blocks.0"]
    assert all(p.on_kernel for p in plan if p.shape[0] == 512)  # 64 ... 4096 tokens


def test_one_end_to_end_check_per_resolution() -> None:
    shapes = [(768, 768, 1), (768, 768, 4), (512, 512, 2), (768, 512, 1)]
    assert one_shape_per_resolution(shapes) == [(768, 768, 1), (512, 512, 2), (768, 512, 1)]
