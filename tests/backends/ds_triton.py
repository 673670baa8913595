"""DeepSpeed's real Triton attention kernel, run by Triton's interpreter on the CPU (tests only).

The kernel is loaded from DeepSpeed's own source file (``ops/transformer/inference/triton_ops.py``) as a
private module with ``TRITON_INTERPRET=1`` set, so ``@triton.jit`` builds an interpreted function: no GPU,
no DeepSpeed import (whose package import picks an accelerator and takes seconds).

``launch`` repeats DeepSpeed's launch (``triton_flash_attn.forward``: block 128 when the token count divides
by 128, else 64; one program per query block and head) but with q, k, v and the output inside buffers that
have a guard region after them: at token counts the kernel does not handle, it reads and writes past each
head's rows, and in the interpreter those accesses would otherwise hit the test process's heap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

_MODULE: ModuleType | None = None


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """TRITON_INTERPRET=1 while loading and while launching (triton.language checks it at call time)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def kernel_module() -> ModuleType:
    """DeepSpeed's triton_ops.py, loaded under the interpreter (skips the caller when absent)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does it)")
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("deepspeed is not installed (scripts/setup.sh installs it with the [dev] extra)")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "transformer" / "inference" / "triton_ops.py"
    with interpreted():
        file_spec = importlib.util.spec_from_file_location("_deepspeed_triton_ops_interpreted", path)
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    _MODULE = module
    return module


def exact_attention(q: Any, k: Any, v: Any, scale: float) -> Any:
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    return scores.softmax(-1) @ v.float()


def launch(q: Any, k: Any, v: Any, scale: float, query_blocks: list[int] | None = None) -> tuple[Any, int]:
    """DeepSpeed's launch of its kernel on guarded buffers: (output, values written past the output).

    ``query_blocks`` runs only those query blocks (each still attends over every key): the interpreter
    needs minutes for all of 9,216 tokens, and every block runs the same code.
    """
    mod = kernel_module()
    z, h, n, d = q.shape
    block = 128 if n % 128 == 0 else 64  # as triton_flash_attn.forward(..., block_128=n % 128 == 0)
    guard = 2 * block * d  # more than a whole block of rows past the last head

    def guarded(t: Any) -> Any:
        flat = torch.zeros(t.numel() + guard, dtype=torch.float16)
        flat[: t.numel()] = t.reshape(-1).half()
        return flat

    qf, kf, vf = guarded(q), guarded(k), guarded(v)
    sentinel = -12345.0
    of = torch.full((z * h * n * d + guard,), sentinel, dtype=torch.float16)
    body = z * h * n * d

    strides = (h * n * d, n * d, d, 1)  # contiguous [z, h, n, d], as DeepSpeed's QKV op returns them
    blocks = query_blocks if query_blocks is not None else list(range(-(-n // block)))
    for qb in blocks:
        # One query block: Q and Out start at its first row; K and V are whole (the kernel walks every key).
        # The interpreter maps a tensor's whole storage, so the guard region is reachable and nothing else.
        first = qb * block * d
        with interpreted():
            mod._fwd_kernel[(1, z * h)](
                qf[first:],
                kf,
                vf,
                scale,
                of[first:],
                *strides,
                *strides,
                *strides,
                *strides,
                z,
                h,
                n,
                BLOCK_M=block,
                BLOCK_N=block,
                BLOCK_DMODEL=d,
                num_warps=4 if d <= 64 else 8,
                num_stages=1,
            )
    out = of[:body].view(z, h, n, d).float()
    overrun = int((of[body:] != sentinel).sum())
    return out, overrun
