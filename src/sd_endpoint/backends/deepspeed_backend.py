"""The DeepSpeed backend: DeepSpeed-Inference's diffusers kernels in the UNet, CUDA graphs per warm shape.

Decision: a small compatibility layer of ours over DeepSpeed's injection kernels, not DeepSpeed-MII.

MII's text-to-image exists only in ``mii.legacy`` (deepspeed-mii 0.3.3). It calls
``deepspeed.init_inference(pipe, replace_with_kernel_inject=True)`` on a diffusers pipeline and adds a gRPC
server around it - nothing else, no further kernels. That call cannot run with what we ship:
``generic_injection`` wraps the text encoder in ``DSClipEncoder``, which patches
``CLIPTextModel.text_model`` - gone in transformers 5, which diffusers >= 0.40 requires. A pinned second
environment (diffusers <= 0.39, transformers < 5, huggingface-hub < 1) would fork our whole dependency set
for one backend, and would still keep two upstream defects:

* SD 2.1 sets ``upcast_attention``: its fp16 attention scores overflow. DeepSpeed's cross-attention
  computes ``(q @ k^T) * scale`` and the softmax in fp16 with no upcast (upstream reports of wrong SD 2.1
  images). Its self-attention is a Triton flash kernel that accumulates in fp32, which is safe.
* ``DSUNet`` captures one CUDA graph, for the first shape it sees; another batch size or resolution fails,
  and concurrent calls share its static buffers.

So this module injects the same kernels itself, into a copy of the UNet that shares the weights:

* every ``BasicTransformerBlock`` becomes ``DeepSpeedDiffusersTransformerBlock``: a CUDA LayerNorm for the
  first norm, a CUDA bias-GEGLU kernel, a CUDA NHWC bias-add(+residual) kernel at the end; its "fused
  LayerNorm + residual" for the second and third norms is a pure-PyTorch fp32 classmethod, not a kernel;
* its self-attention becomes ``DeepSpeedDiffusersAttention`` (one QKV GEMM + the 2023 Triton tutorial
  flash-attention kernel, ``num_stages=1``), wrapped in ``ExactGuard``: the kernel only at token counts it
  computes exactly (multiples of 64), diffusers' SDPA attention on the same weights elsewhere
  (deepspeed_attention.py); the weights are prepared as DeepSpeed's injection prepares them, without
  transposing shared tensors in place as upstream does;
* its cross-attention stays diffusers' ``Attention`` with the classic processor, which upcasts the scores
  and the softmax to fp32 when the model asks for it (SD 2.1); where it does not, DeepSpeed's kernel runs;
* the whole UNet is captured as one CUDA graph per warm shape (``UNetRunner``), with DeepSpeed's global
  workspace sized by the largest shape before any capture.

The text encoder (~0.1 TFLOP per request) and the VAE (whose DeepSpeed wrapper has no kernels, only a
graph) run as on the diffusers path. Other shapes never reach this backend: ``routing.RoutingBackend``
sends them to the diffusers path, so the kernels only ever run shapes that passed the start-up checks.

DeepSpeed keeps two pieces of process-global state, handled here: ``DeepSpeedDiffusersAttention.layer_id``
(a class counter; only the module with id 0 allocates the shared workspace, so a second injection in one
process would run on a null workspace) is reset before injecting; the workspace itself is a raw
``cudaMalloc`` (0.56 GB at batch 1, invisible to torch's allocator statistics) that ``release`` frees and
``workspace_bytes`` measures.

Everything that touches ``deepspeed`` is imported inside functions: this module imports without it.
DeepSpeed compiles its ``transformer_inference`` and ``spatial_inference`` ops with nvcc on first use
(about a minute); images built for serving should pre-build them
(``DS_BUILD_TRANSFORMER_INFERENCE=1 DS_BUILD_SPATIAL_INFERENCE=1 pip install deepspeed``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sd_endpoint.backends.deepspeed_attention import ExactGuard, LayerTokens, plan_summary, token_plan
from sd_endpoint.backends.diffusers_backend import DiffusersBackend, WarmShape, shape_label
from sd_endpoint.jobs import GenerationSpec

log = logging.getLogger(__name__)


class DeepSpeedUnavailable(RuntimeError):
    """The DeepSpeed path cannot run here; the message says why (for logs, /ready and metrics)."""


class Kernels(Protocol):
    """Builds the replacement modules; the real one is DeepSpeed's, tests pass fakes."""

    def attention(self, attn: Any) -> Any: ...

    def block(self, block: Any) -> Any: ...

    def reset(self) -> None:
        """Forget state from an earlier injection in this process (DeepSpeed's layer counter)."""
        ...


@dataclass
class InjectionReport:
    blocks: int = 0
    self_attention: int = 0
    cross_attention_kernel: int = 0
    cross_attention_upcast: int = 0

    def summary(self) -> str:
        return (
            f"{self.blocks} transformer blocks, {self.self_attention} self-attentions on DeepSpeed kernels, "
            f"{self.cross_attention_upcast} cross-attentions kept in diffusers with fp32 upcast, "
            f"{self.cross_attention_kernel} on DeepSpeed kernels"
        )


class ContextAttention(torch.nn.Module):
    """Lets diffusers' ``Attention`` sit where DeepSpeed's block expects its own attention module.

    DeepSpeed's block calls ``attn_2(hidden, context=...)``; diffusers' module takes
    ``encoder_hidden_states``. The classic ``AttnProcessor`` honours ``upcast_attention`` and
    ``upcast_softmax`` (scores and softmax in fp32), which SDPA-based processors ignore.
    """

    def __init__(self, inner: Any) -> None:
        from diffusers.models.attention_processor import AttnProcessor

        super().__init__()
        self.inner = inner
        inner.set_processor(AttnProcessor())

    def forward(self, hidden_states: Any, context: Any = None, input_mask: Any = None) -> Any:
        return self.inner(hidden_states, encoder_hidden_states=context)


def shared_copy(module: Any) -> Any:
    """A structural copy of ``module`` whose parameters and buffers are the original's (no memory)."""
    memo: dict[int, Any] = {id(t): t for t in module.parameters()}
    memo.update({id(t): t for t in module.buffers()})
    return copy.deepcopy(module, memo)


def _check_block(name: str, block: Any) -> None:
    """DeepSpeed's block implements exactly SD's layout; refuse anything else rather than compute it wrong."""
    problems = []
    if getattr(block, "norm_type", "layer_norm") != "layer_norm":
        problems.append(f"norm_type {block.norm_type}")
    if getattr(block, "only_cross_attention", False):
        problems.append("only_cross_attention")
    if getattr(block, "attn2", None) is None:
        problems.append("no cross-attention")
    if getattr(block, "pos_embed", None) is not None:
        problems.append("positional embedding")
    ff_in = getattr(getattr(block, "ff", None), "net", [None])[0]
    if type(ff_in).__name__ != "GEGLU":
        problems.append(f"feed-forward {type(ff_in).__name__}")
    if problems:
        raise DeepSpeedUnavailable(f"{name}: DeepSpeed's transformer block cannot run it ({', '.join(problems)})")


def inject(unet: Any, kernels: Kernels) -> InjectionReport:
    """Replace the transformer blocks of ``unet`` in place (call it on a ``shared_copy``)."""
    from diffusers.models.attention import BasicTransformerBlock

    report = InjectionReport()
    targets = [(n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    if not targets:
        raise DeepSpeedUnavailable("the UNet has no diffusers BasicTransformerBlock to inject kernels into")
    for name, block in targets:  # all checked before any is touched
        _check_block(name, block)
    kernels.reset()
    for name, block in targets:
        block.attn1 = ExactGuard(kernels.attention(block.attn1), block.attn1)
        report.self_attention += 1
        if getattr(block.attn2, "upcast_attention", False):
            block.attn2 = ContextAttention(block.attn2)
            report.cross_attention_upcast += 1
        else:
            block.attn2 = kernels.attention(block.attn2)
            report.cross_attention_kernel += 1
        parent_name, _, attr = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, attr, kernels.block(block))  # a ModuleList takes "0", "1"... as names too
        report.blocks += 1
    return report


class DeepSpeedKernels:
    """DeepSpeed-Inference's diffusers modules, prepared the way ``generic_injection`` prepares them.

    ``classes`` (attention, block, inference config, block config) replaces DeepSpeed's for tests.
    """

    def __init__(self, classes: tuple[Any, Any, Any, Any] | None = None) -> None:
        if classes is None:
            classes = _deepspeed_classes()
        self.attention_cls, self.block_cls, self.config_cls, self.block_config = classes

    def attention(self, attn: Any) -> Any:
        q, k, v = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
        out = attn.to_out[0]
        if attn.to_q.bias is not None or attn.to_k.bias is not None or attn.to_v.bias is not None:
            raise DeepSpeedUnavailable("DeepSpeed's diffusers attention has no q/k/v bias")
        config = self.config_cls(
            hidden_size=q.shape[-1],
            heads=attn.heads,
            dtype=torch.float16,
            triangular_masking=False,
            max_out_tokens=4096,
        )
        module = self.attention_cls(config)
        # New tensors, [in, out] as the kernels read them; upstream transposes the shared weights in place.
        # The placeholders the constructor made for the unused layout are emptied, not moved to the GPU.
        unused = torch.empty(0, dtype=torch.float16, device=q.device)
        # Upstream tells self- from cross-attention by comparing widths, which fails when the text width
        # equals the channel width; diffusers records which one it is.
        if not attn.is_cross_attention:
            module.attn_qkvw.data = torch.cat([q, k, v], dim=0).t().contiguous()
            for name in ("attn_qw", "attn_kw", "attn_vw"):
                getattr(module, name).data = unused
        else:
            module.attn_qkvw = None
            module.attn_qw.data = q.t().contiguous()
            module.attn_kw.data = k.t().contiguous()
            module.attn_vw.data = v.t().contiguous()
        module.attn_qkvb = None
        module.attn_ow.data = out.weight.t().contiguous()
        module.attn_ob.data = out.bias.detach().clone()
        return module.to(q.device)

    def block(self, block: Any) -> Any:
        return self.block_cls(block, self.block_config()).to(block.norm1.weight.device)

    def reset(self) -> None:
        self.attention_cls.layer_id = 0  # the module numbered 0 allocates the workspace on its first call


def release_workspace(unet: Any) -> bool:
    """Free DeepSpeed's workspace (a raw cudaMalloc torch cannot see); True when there was one to free."""
    for module in unet.modules():
        workspace = getattr(module, "workspace", None)
        if workspace is not None and hasattr(workspace, "release_workspace"):
            workspace.release_workspace()
            return True
    return False


def memory_outside_torch(device: Any) -> tuple[int, int]:
    """(bytes in use on the device, bytes torch's allocator reserved): the difference is everyone else's."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free, torch.cuda.memory_reserved(device)


def _deepspeed_classes() -> tuple[Any, Any, Any, Any]:
    try:
        import deepspeed  # noqa: F401 - sets up its accelerator
        from deepspeed.ops.transformer.inference.config import DeepSpeedInferenceConfig
        from deepspeed.ops.transformer.inference.diffusers_2d_transformer import Diffusers2DTransformerConfig
        from deepspeed.ops.transformer.inference.diffusers_attention import DeepSpeedDiffusersAttention
        from deepspeed.ops.transformer.inference.diffusers_transformer_block import (
            DeepSpeedDiffusersTransformerBlock,
        )
    except Exception as exc:  # noqa: BLE001 - any import failure means no DeepSpeed path
        raise DeepSpeedUnavailable(f"cannot import DeepSpeed's inference kernels: {type(exc).__name__}: {exc}") from exc
    return (
        DeepSpeedDiffusersAttention,
        DeepSpeedDiffusersTransformerBlock,
        DeepSpeedInferenceConfig,
        Diffusers2DTransformerConfig,
    )


def captured_batch_sizes(shapes: Sequence[WarmShape], spec: GenerationSpec) -> list[int]:
    """Image batch sizes whose UNet shape was captured for this spec, largest first ([] when none).

    With guidance the UNet sees two rows per image (conditional and unconditional), without it one, so
    a graph captured for b images with guidance also serves 2b images without.
    """
    if spec.task != "text-to-image":
        return []  # graphs were captured and self-checked for text-to-image; other tasks take the diffusers path
    cfg = spec.guidance_scale > 1
    sizes = {b if cfg else 2 * b for h, w, b in shapes if (h, w) == (spec.height, spec.width)}
    return sorted(sizes, reverse=True)


class DeepSpeedBackend(DiffusersBackend):
    """The diffusers pipeline with a DeepSpeed-injected, graph-captured UNet; only the captured shapes."""

    name = "deepspeed"

    def __init__(
        self,
        base: DiffusersBackend,
        *,
        unet: Any,
        runner: Any,
        shapes: Sequence[WarmShape],
        report: InjectionReport,
        plan: Sequence[LayerTokens] = (),
        workspace_bytes: int = 0,
    ) -> None:
        """``unet`` is the injected copy, ``runner`` its captured UNetRunner; the rest is ``base``'s."""
        from sd_endpoint.model.pipeline import build_pipeline

        p = base.pipe
        pipe = build_pipeline(
            "text-to-image",
            vae=p.vae,
            text_encoder=p.text_encoder,
            tokenizer=p.tokenizer,
            unet=unet,
            scheduler=p.scheduler,
        )
        super().__init__(
            pipe,
            placement_reason=base.placement_reason,
            source=base.source,
            optimise=False,
            compile=False,
            cuda_graphs=False,
            lock=base.lock,  # one tokenizer, one lock: two locks let two threads in ("Already borrowed")
            runner=runner,
        )
        self.report = report
        self.plan = list(plan)
        self.workspace_bytes = workspace_bytes
        self.warm_shapes = list(dict.fromkeys(shapes))
        self.optimisations = ["DeepSpeed transformer kernels", "CUDA graphs"]

    @classmethod
    def create(
        cls, base: DiffusersBackend, shapes: Sequence[WarmShape], *, kernels: Kernels | None = None
    ) -> DeepSpeedBackend:
        """Inject and capture next to ``base`` (whose modules it shares); raises DeepSpeedUnavailable."""
        from sd_endpoint.backends.unet_runner import UNetRunner, unet_inputs_for

        if base.device.type != "cuda":
            raise DeepSpeedUnavailable(f"DeepSpeed's kernels need CUDA; the model is on {base.device}")
        if base.dtype != torch.float16:
            raise DeepSpeedUnavailable(f"DeepSpeed's kernel injection is fp16-only; the model is {base.dtype}")
        if not shapes:
            raise DeepSpeedUnavailable("no warm shapes to capture (SD_ENDPOINT_WARM_SHAPES is empty)")
        kernels = kernels or DeepSpeedKernels()
        raw = base.raw_unet
        unet = shared_copy(raw)
        report = inject(unet, kernels)
        unet.requires_grad_(False)
        plan = token_plan(unet, shapes)
        log.info("DeepSpeed injection: %s; %s", report.summary(), plan_summary(plan))
        runner = UNetRunner(unet, strict=True, label="deepspeed UNet")
        used, reserved = memory_outside_torch(base.device)
        try:
            runner.warm([unet_inputs_for(raw, h, w, b) for h, w, b in shapes], graphs=True)
        except BaseException:
            runner.release()
            release_workspace(unet)
            raise
        used2, reserved2 = memory_outside_torch(base.device)
        workspace = max(0, (used2 - used) - (reserved2 - reserved))
        return cls(base, unet=unet, runner=runner, shapes=shapes, report=report, plan=plan, workspace_bytes=workspace)

    def release(self) -> None:
        """Free the graphs and DeepSpeed's workspace; this backend serves nothing after."""
        if self.runner is not None:
            self.runner.release()
        if release_workspace(self.raw_unet):
            self.workspace_bytes = 0
        self.warm_shapes = []
        torch.cuda.empty_cache()

    # -- routing -----------------------------------------------------------------------------
    def batch_sizes(self, spec: GenerationSpec) -> list[int]:
        return captured_batch_sizes(self.warm_shapes, spec)

    def supports(self, spec: GenerationSpec) -> bool:
        return spec.cache_interval == 1 and bool(self.batch_sizes(spec))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["deepspeed_injection"] = self.report.summary()
        info["captured_shapes"] = shape_label(self.warm_shapes)
        info["deepspeed_attention"] = plan_summary(self.plan)
        info["deepspeed_workspace_gb"] = round(self.workspace_bytes / 1e9, 3)
        return info
