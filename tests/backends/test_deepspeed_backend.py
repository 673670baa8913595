"""The DeepSpeed path up to the CUDA boundary: lazy imports, preconditions, the injection walk, the weight
layout the kernels receive, and the fp32-upcast cross-attention that SD 2.1 needs in fp16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sd_endpoint.backends.deepspeed_attention import ExactGuard
from sd_endpoint.backends.deepspeed_backend import (
    ContextAttention,
    DeepSpeedBackend,
    DeepSpeedKernels,
    DeepSpeedUnavailable,
    inject,
    shared_copy,
)
from sd_endpoint.backends.diffusers_backend import DiffusersBackend

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_modules_import_and_select_without_touching_deepspeed(tmp_path: Path) -> None:
    # A 'deepspeed' that explodes when imported: only find_spec may look at it.
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "__init__.py").write_text("raise ImportError('deepspeed must not be imported')\n")
    code = (
        "import sys\n"
        "import sd_endpoint.backends, sd_endpoint.backends.selection as s, sd_endpoint.backends.deepspeed_backend\n"
        "assert s.deepspeed_installed()\n"
        "print(s.deepspeed_blocker('cpu', 'bfloat16', [(768, 768, 1)]))\n"
        "assert 'deepspeed' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


def test_kernels_without_deepspeed_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(DeepSpeedUnavailable, match="cannot import DeepSpeed's inference kernels"):
        DeepSpeedKernels()


def test_create_refuses_a_cpu_model_before_importing_anything(backend: DiffusersBackend) -> None:
    with pytest.raises(DeepSpeedUnavailable, match="need CUDA; the model is on cpu"):
        DeepSpeedBackend.create(backend, [(64, 64, 1)], kernels=None)


class FakeAttention(torch.nn.Module):
    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner


class FakeBlock(torch.nn.Module):
    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner


class FakeKernels:
    def attention(self, attn: Any) -> Any:
        return FakeAttention(attn)

    def block(self, block: Any) -> Any:
        return FakeBlock(block)

    def reset(self) -> None:
        self.resets = getattr(self, "resets", 0) + 1


def _blocks(unet: Any) -> list[Any]:
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def test_injection_replaces_blocks_in_a_weight_sharing_copy(backend: DiffusersBackend) -> None:
    original = backend.pipe.unet
    before = {n: p.data_ptr() for n, p in original.named_parameters()}
    processors = {n: type(p) for n, p in original.attn_processors.items()}
    n_blocks = len(_blocks(original))
    assert n_blocks > 0

    copy = shared_copy(original)
    kernels = FakeKernels()
    report = inject(copy, kernels)
    assert kernels.resets == 1  # DeepSpeed's layer counter is reset before any module is made

    assert report.blocks == n_blocks and report.self_attention == n_blocks
    # SD 2.1 (and the tiny model) sets upcast_attention: cross-attention stays in diffusers with fp32 scores.
    assert report.cross_attention_upcast == n_blocks and report.cross_attention_kernel == 0
    replaced = [m for m in copy.modules() if isinstance(m, FakeBlock)]
    assert len(replaced) == n_blocks and _blocks(copy) == [b.inner for b in replaced]
    for block in replaced:
        # The kernel's attention behind the guard that sends non-exact token counts to diffusers' attention.
        assert isinstance(block.inner.attn1, ExactGuard) and isinstance(block.inner.attn1.kernel, FakeAttention)
        assert isinstance(block.inner.attn2, ContextAttention)
    # The diffusers path's UNet is untouched and no weight was copied.
    assert len(_blocks(original)) == n_blocks and not any(isinstance(m, FakeBlock) for m in original.modules())
    assert {n: type(p) for n, p in original.attn_processors.items()} == processors
    shared = {p.data_ptr() for p in copy.parameters()}
    assert set(before.values()) <= shared


def test_cross_attention_without_upcast_goes_to_the_kernel(backend: DiffusersBackend) -> None:
    copy = shared_copy(backend.pipe.unet)
    for block in _blocks(copy):
        block.attn2.upcast_attention = False
    report = inject(copy, FakeKernels())
    assert report.cross_attention_kernel == report.blocks and report.cross_attention_upcast == 0


def test_injection_refuses_blocks_the_kernels_cannot_compute(backend: DiffusersBackend) -> None:
    copy = shared_copy(backend.pipe.unet)
    _blocks(copy)[0].norm_type = "ada_norm"
    with pytest.raises(DeepSpeedUnavailable, match="norm_type ada_norm"):
        inject(copy, FakeKernels())


class FakeDSAttention(torch.nn.Module):
    """DeepSpeedDiffusersAttention's parameters, as its constructor makes them (on the CPU)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        h = config["hidden_size"]
        self.config = config
        for name, shape in [("attn_qkvw", (h, 3 * h)), ("attn_qw", (h, h)), ("attn_kw", (h, h)), ("attn_vw", (h, h))]:
            setattr(self, name, torch.nn.Parameter(torch.empty(shape, dtype=torch.float16), requires_grad=False))
        self.attn_qkvb = torch.nn.Parameter(torch.empty(3 * h), requires_grad=False)
        self.attn_ow = torch.nn.Parameter(torch.empty(h, h, dtype=torch.float16), requires_grad=False)
        self.attn_ob = torch.nn.Parameter(torch.empty(h, dtype=torch.float16), requires_grad=False)


def test_kernel_weights_are_new_tensors_in_the_layout_deepspeed_reads(backend: DiffusersBackend) -> None:
    kernels = DeepSpeedKernels(classes=(FakeDSAttention, FakeBlock, lambda **kw: kw, object))
    block = _blocks(shared_copy(backend.pipe.unet))[0]
    attn = block.attn1
    q, k, v, o = (
        t.detach().clone() for t in (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, attn.to_out[0].weight)
    )
    module = kernels.attention(attn)
    assert module.config["hidden_size"] == q.shape[1] and module.config["heads"] == attn.heads
    assert module.config["dtype"] == torch.float16 and module.config["triangular_masking"] is False
    # x @ W^T for q, k, v stacked: DeepSpeed multiplies x @ attn_qkvw, so attn_qkvw = [Wq; Wk; Wv]^T.
    assert torch.equal(module.attn_qkvw, torch.cat([q, k, v]).t())
    assert torch.equal(module.attn_ow, o.t()) and torch.equal(module.attn_ob, attn.to_out[0].bias)
    assert module.attn_qkvb is None and module.attn_qw.numel() == 0
    # Upstream transposes the shared weights in place; here the diffusers path keeps its own.
    assert torch.equal(attn.to_q.weight, q) and torch.equal(attn.to_out[0].weight, o)
    cross = kernels.attention(block.attn2)
    assert cross.attn_qkvw is None
    assert torch.equal(cross.attn_kw, block.attn2.to_k.weight.t())


def _overflowing_cross_attention() -> tuple[Any, Any, Any]:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32, upcast_attention=True)
    with torch.no_grad():
        attn.to_q.weight.fill_(1.0)  # q ~ 128, k ~ 64: q.k ~ 2.6e5, past fp16's 65504
        attn.to_k.weight.fill_(1.0)
    hidden = torch.full((1, 16, 64), 2.0) + 0.01 * torch.randn(1, 16, 64)
    context = torch.full((1, 7, 32), 2.0) + 0.01 * torch.randn(1, 7, 32)
    return attn, hidden, context


def test_context_attention_upcasts_where_plain_fp16_overflows() -> None:
    attn, hidden, context = _overflowing_cross_attention()
    with torch.no_grad():
        reference = attn(hidden, encoder_hidden_states=context)  # fp32
        half = attn.half()
        q = half.to_q(hidden.half()).view(1, 16, 2, 32).transpose(1, 2)
        k = half.to_k(context.half()).view(1, 7, 2, 32).transpose(1, 2)
        naive = torch.matmul(q, k.transpose(-1, -2)) * 32**-0.5  # what DeepSpeed's cross-attention does
        assert not torch.isfinite(naive).all()
        adapted = ContextAttention(half)(hidden.half(), context=context.half())
    assert torch.isfinite(adapted).all()
    torch.testing.assert_close(adapted.float(), reference, rtol=2e-2, atol=2e-2)
