"""Where DeepSpeed's Triton self-attention is exact, and the guard that keeps it out of everywhere else.

DeepSpeed 0.19.8's diffusers self-attention runs ``triton_ops._fwd_kernel`` (the 2023 Triton tutorial
flash-attention kernel) with a 128-token block when the token count divides by 128 and a 64-token block
otherwise, and it loads and stores whole blocks without bounds checks. So it is exact only when the
token count is a multiple of 64; at any other count each head's softmax reads keys of the next head and
the last head writes past its output buffer (at SD 2.1's 768x768 middle block, 12x12 = 144 tokens: 0.76
relative error and 3,072 values written out of bounds; tests/backends/test_deepspeed_triton.py runs the
real kernel in Triton's interpreter). ``ExactGuard`` sends each call to the kernel only where it is exact
and to diffusers' own attention (SDPA, same weights) elsewhere; ``token_plan`` lists, for every warm shape,
every self-attention's token count and which of the two runs it.

The kernel also needs Triton's block pointers (``tl.make_block_ptr``), which Triton 3.9 removed: with
Triton >= 3.9 it does not compile at all, and ``triton_blocker`` says so before anything is built.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# DeepSpeed's launch: BLOCK = 128 if tokens % 128 == 0 else 64 (diffusers_attention.selfAttention_fp).
KERNEL_BLOCK = 64
# DeepSpeed's flash path runs only for head sizes up to 128 (larger ones take its plain matmul path).
KERNEL_MAX_HEAD_DIM = 128


def kernel_exact(tokens: int) -> bool:
    """Whether DeepSpeed's Triton attention computes ``tokens`` tokens exactly (no partial blocks)."""
    block = 128 if tokens % 128 == 0 else KERNEL_BLOCK
    return tokens > 0 and tokens % block == 0


def triton_blocker() -> str | None:
    """Why DeepSpeed's Triton kernel cannot compile here, or None. Reads package metadata only."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "Triton is not installed (DeepSpeed's diffusers attention is a Triton kernel)"
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if major_minor >= (3, 9):
        return f"Triton {version} removed tl.make_block_ptr, which DeepSpeed's attention kernel uses (needs < 3.9)"
    return None


@dataclass(frozen=True)
class LayerTokens:
    """One self-attention at one warm shape: how many tokens it attends over and who computes it."""

    block: str  # the BasicTransformerBlock's module name in the UNet
    shape: tuple[int, int, int]  # (height, width, images)
    tokens: int

    @property
    def on_kernel(self) -> bool:
        return kernel_exact(self.tokens)


def _level_sizes(config: Any, height: int, width: int) -> list[tuple[int, int]]:
    """The latent (h, w) each down block works at; the mid block works at the last level."""
    h, w = height // 8, width // 8  # SD's VAE factor
    sizes = []
    for i, _ in enumerate(config.down_block_types):
        sizes.append((h, w))
        if i < len(config.down_block_types) - 1:  # every down block but the last downsamples
            h, w = -(-h // 2), -(-w // 2)  # conv stride 2, padding 1: ceil
    return sizes


def block_tokens(unet: Any, block_name: str, height: int, width: int) -> int:
    """Tokens seen by the transformer block ``block_name`` (``down_blocks.0.attentions...``) at a size."""
    sizes = _level_sizes(unet.config, height, width)
    parts = block_name.split(".")
    if parts[0] == "down_blocks":
        h, w = sizes[int(parts[1])]
    elif parts[0] == "up_blocks":
        h, w = sizes[len(sizes) - 1 - int(parts[1])]  # up block i mirrors down block n-1-i
    elif parts[0] == "mid_block":
        h, w = sizes[-1]
    else:
        raise ValueError(f"{block_name}: not a down, mid or up block of a UNet2DConditionModel")
    return h * w


def token_plan(unet: Any, shapes: Sequence[tuple[int, int, int]]) -> list[LayerTokens]:
    """Every self-attention of ``unet`` at every warm shape, with its token count."""
    from diffusers.models.attention import BasicTransformerBlock

    names = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    return [LayerTokens(n, (h, w, b), block_tokens(unet, n, h, w)) for h, w, b in shapes for n in names]


def plan_summary(plan: Sequence[LayerTokens]) -> str:
    on = sum(1 for p in plan if p.on_kernel)
    counts = sorted({p.tokens for p in plan if not p.on_kernel})
    off = f"{len(plan) - on} on SDPA (token counts {counts}, not multiples of {KERNEL_BLOCK})"
    return f"self-attention at the warm shapes: {on} layer-shapes on DeepSpeed's Triton kernel, {off}"


class ExactGuard(torch.nn.Module):
    """DeepSpeed's self-attention where its kernel is exact, diffusers' attention (same weights) elsewhere.

    The choice depends only on the token count, a static shape, so it is fixed inside a captured graph.
    Both paths add the output projection's bias themselves (the DeepSpeed block folds that bias into its
    residual only when ``attn_1`` *is* a DeepSpeed attention, which this wrapper is not).
    """

    def __init__(self, kernel: Any, exact: Any) -> None:
        super().__init__()
        self.kernel = kernel
        self.exact = exact
        self.calls = {"kernel": 0, "exact": 0}  # per layer, for tests and describe()

    def forward(
        self,
        hidden_states: Any,
        context: Any = None,
        input_mask: Any = None,
        *,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
    ) -> Any:
        # DeepSpeed's block passes ``context``; diffusers' (used by the tests' injected blocks) the keywords.
        context = encoder_hidden_states if context is None else context
        if context is None and attention_mask is None and kernel_exact(int(hidden_states.shape[1])):
            self.calls["kernel"] += 1
            return self.kernel(hidden_states, None, input_mask)
        self.calls["exact"] += 1
        return self.exact(hidden_states, encoder_hidden_states=context, attention_mask=attention_mask)
