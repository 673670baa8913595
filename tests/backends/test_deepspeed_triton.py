"""DeepSpeed's Triton self-attention kernel against exact attention, in Triton's interpreter on the CPU.

SD 2.1's self-attentions at its warm shapes attend over 64 (512px mid block) ... 9,216 (768px top level)
tokens; at 768x768 the mid block has 144. The kernel must be exact wherever ``kernel_exact`` lets it run,
and ``kernel_exact`` must refuse the counts where it is not.
"""

from __future__ import annotations

import pytest
import torch

from sd_endpoint.backends.deepspeed_attention import kernel_exact
from tests.backends import ds_triton

HEADS, HEAD_DIM = 2, 16  # two heads so that reads across the head boundary show; 16 is tl.dot's minimum
FP16_TOLERANCE = 2e-3  # fp16 inputs and P, fp32 accumulation: measured ~4e-4


def qkv(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(tokens)
    return tuple(torch.randn(1, HEADS, tokens, HEAD_DIM, generator=gen).half() for _ in range(3))  # type: ignore[return-value]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tokens", [64, 576])
def test_deepspeeds_own_launch_is_exact_at_multiples_of_64(tokens: int) -> None:
    mod = ds_triton.kernel_module()
    q, k, v = qkv(tokens)
    scale = HEAD_DIM**-0.5
    # Exactly DeepSpeed's call (diffusers_attention.selfAttention_fp), in bounds at these counts.
    with ds_triton.interpreted():
        got = mod.triton_flash_attn()(q, k, v, scale, tokens % 128 == 0)
    assert kernel_exact(tokens)
    assert rel(got, ds_triton.exact_attention(q, k, v, scale)) < FP16_TOLERANCE
    # The guarded launcher the other cases use computes what DeepSpeed's own launch computes.
    mine, overrun = ds_triton.launch(q, k, v, scale)
    assert overrun == 0
    assert torch.equal(mine.half(), got)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("tokens", "blocks"), [(2304, [0, 17]), (9216, [0, 35, 71])])
def test_kernel_is_exact_at_the_large_levels(tokens: int, blocks: list[int]) -> None:
    # 2,304 = 48x48 and 9,216 = 96x96 tokens (768px); the first, a middle and the last query block, each
    # against all keys (the whole grid takes the interpreter minutes).
    q, k, v = qkv(tokens)
    scale = HEAD_DIM**-0.5
    got, overrun = ds_triton.launch(q, k, v, scale, query_blocks=blocks)
    want = ds_triton.exact_attention(q, k, v, scale)
    assert kernel_exact(tokens) and overrun == 0
    for b in blocks:
        rows = slice(b * 128, (b + 1) * 128)
        assert rel(got[:, :, rows], want[:, :, rows]) < FP16_TOLERANCE, f"query block {b}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kernel_is_wrong_at_144_tokens_and_kernel_exact_refuses_it() -> None:
    # SD 2.1's mid block at 768x768: 12x12 latents. Block 64: the third block holds 16 real rows and 48 of
    # the next head's (or, for the last head, past the buffer).
    q, k, v = qkv(144)
    scale = HEAD_DIM**-0.5
    got, overrun = ds_triton.launch(q, k, v, scale)
    assert rel(got, ds_triton.exact_attention(q, k, v, scale)) > 0.1
    assert overrun == 48 * HEAD_DIM  # the last head's third block wrote 48 rows past the output
    assert not kernel_exact(144)


@pytest.mark.parametrize(
    ("tokens", "exact"),
    [(16, False), (64, True), (144, False), (256, True), (576, True), (1024, True), (2304, True), (9216, True)],
)
def test_kernel_exact_rule(tokens: int, exact: bool) -> None:
    assert kernel_exact(tokens) is exact
