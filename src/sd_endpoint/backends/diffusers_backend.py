"""The plain-PyTorch backend: diffusers' StableDiffusionPipeline, one call per batch of images.

Speed, by device (each step keeps the images equal to plain diffusers' within that precision):

* CUDA fp16: SDPA attention (flash / memory-efficient kernels accumulate in fp32, so SD 2.1's
  ``upcast_attention`` overflow cannot happen), fused QKV projections, cuDNN autotuning (torch_setup.py),
  and for the warm shapes (SD_ENDPOINT_WARM_SHAPES) a CUDA graph per shape over a ``torch.compile``'d UNet
  (SD_ENDPOINT_COMPILE=auto). Other shapes run eagerly. NCHW, not channels-last: PyTorch's CUDA GroupNorm
  forces NCHW, so channels-last adds two layout conversions around each of the UNet's ~60 GroupNorms; on
  an H200 it cost 10% at batch 4 (benchmarks/gpu.py; unmeasured at batch 1).
* CPU bf16 (chosen where the CPU has native bf16): channels-last UNet and VAE (oneDNN's bf16 convolutions
  are fastest in NHWC), optional ``torch.compile`` with weight freezing for the warm shapes.
* CPU fp32: nothing changes, so the output is bit-identical to plain diffusers (the tests' reference).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, SchedulerName, StepCallback

log = logging.getLogger(__name__)

# Scheduler classes by contract name; each is built from the model's own scheduler config, so it keeps
# SD 2.1's v-prediction and beta schedule.
SCHEDULER_CLASSES: dict[SchedulerName, str] = {
    "ddim": "DDIMScheduler",
    "dpm_solver_multistep": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}

WarmShape = tuple[int, int, int]  # (height, width, images per batch)


def wants_channels_last(device_type: str, dtype_name: str) -> bool:
    """Where the backend runs the UNet and VAE in NHWC: CPU bf16/fp16 only.

    CPU bf16: oneDNN's bf16 convolutions are fastest in NHWC (channels-last was worth 10-20% in
    benchmarks/cpu_generation.py's ablation). CUDA: see the module docstring. CPU fp32 is the reference path.
    """
    return device_type == "cpu" and dtype_name != "float32"


def shape_label(shapes: Iterable[WarmShape]) -> str:
    return ",".join(f"{h}x{w}x{b}" for h, w, b in shapes)


class DiffusersBackend:
    """Runs SD 2.x through ``StableDiffusionPipeline.__call__``.

    Thread safety: schedulers keep per-call state (timesteps, step index, DPM-Solver history), so every
    call gets a fresh pipeline object with its own scheduler; the heavy modules are shared read-only.
    """

    name = "diffusers"

    def __init__(
        self,
        pipe: Any,
        *,
        placement_reason: str = "",
        source: str = "",
        optimise: bool = True,
        compile: bool = False,
        cuda_graphs: bool = True,
        fuse_qkv: bool = True,
        lock: threading.Lock | None = None,
        runner: Any = None,
    ) -> None:
        """``lock`` guards the shared tokenizer: a backend over the same modules passes the other's.
        ``runner`` is a UNetRunner already built over ``pipe.unet`` (the DeepSpeed path's captured one)."""
        import torch

        self.pipe = pipe
        self._torch = torch
        self._scheduler_config = dict(pipe.scheduler.config)
        self._own_scheduler = type(pipe.scheduler).__name__
        self.placement_reason = placement_reason
        self.source = source
        self.selection_reason = ""  # why this backend serves; set by backends.selection
        self.nan_redecodes = 0
        self._vae32: Any = None
        self.lock = lock or threading.Lock()
        self.optimisations: list[str] = []
        self.compile = compile
        self.fuse_qkv = fuse_qkv
        self.raw_unet = pipe.unet
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.warm_shapes: list[WarmShape] = []
        if optimise:
            self._optimise()
        self.runner: Any = runner
        if runner is None and (self.compile or self.cuda_graphs):
            from sd_endpoint.backends.unet_runner import UNetRunner

            self.runner = UNetRunner(self.raw_unet, fast=self._compiled_unet(), label=f"{self.name} UNet")
        if self.runner is not None:
            pipe.unet = self.runner

    # -- facts -------------------------------------------------------------------------------
    @property
    def device(self) -> Any:
        return self.raw_unet.device

    @property
    def dtype(self) -> Any:
        return self.raw_unet.dtype

    @property
    def native_size(self) -> tuple[int, int]:
        side = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        return side, side

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": self.name,
            "backend_reason": self.selection_reason,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "placement": self.placement_reason,
            "optimisations": ", ".join(self.optimisations) or "none",
            "warm_shapes": shape_label(self.warm_shapes) or "none",
            "scheduler": self._own_scheduler,
            "prediction_type": self._scheduler_config.get("prediction_type"),
            "native_size": list(self.native_size),
            "model": self.source,
        }
        return info

    def prompt_overflows(self, text: str) -> bool:
        tok = self.pipe.tokenizer
        with self.lock:
            ids = tok(text, truncation=False, add_special_tokens=True)["input_ids"]
        return len(ids) > int(tok.model_max_length)

    def supports(self, spec: GenerationSpec) -> bool:
        return True

    # -- speed-ups ---------------------------------------------------------------------------
    def _optimise(self) -> None:
        torch = self._torch
        device, dtype = self.device, self.dtype
        unet, vae = self.raw_unet, self.pipe.vae
        if device.type == "cpu" and dtype == torch.float32:
            return  # the reference path: bit-identical to plain diffusers
        if device.type == "cuda":
            self.optimisations.append("cudnn autotune")
            if self.fuse_qkv and hasattr(unet, "fuse_qkv_projections") and hasattr(vae, "fuse_qkv_projections"):
                # One GEMM for q,k,v (self-attention) and k,v (cross-attention); SDPA processors.
                unet.fuse_qkv_projections()
                vae.fuse_qkv_projections()
                self.optimisations.append("fused QKV + SDPA")
            else:
                self.optimisations.append("SDPA")
        if wants_channels_last(device.type, str(dtype).replace("torch.", "")):
            # A no-op for weights the fast loader already read into NHWC.
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
            self.optimisations.append("channels-last")

    def _compiled_unet(self) -> Any:
        """The compiled UNet for the warm shapes (torch_setup.prepare configured inductor and its cache)."""
        if not self.compile:
            return None
        self.optimisations.append("torch.compile")
        return self._torch.compile(self.raw_unet, fullgraph=True, dynamic=False)

    def warm(self, shapes: Sequence[WarmShape]) -> float:
        """Compile and/or capture the UNet for these (height, width, batch) shapes; returns seconds."""
        if self.runner is None or not shapes:
            return 0.0  # nothing is shape-specific on this path: every shape runs the same way
        from sd_endpoint.backends.unet_runner import unet_inputs_for

        wanted = list(dict.fromkeys(shapes))
        keys = [unet_inputs_for(self.raw_unet, h, w, b) for h, w, b in wanted]
        try:
            seconds = float(self.runner.warm(keys, graphs=self.cuda_graphs))
        except Exception as exc:  # noqa: BLE001 - a speed-up that cannot start must not stop the service
            what = " and ".join(
                x for x, on in (("torch.compile", self.compile), ("CUDA graphs", self.cuda_graphs)) if on
            )
            log.warning("%s warm-up failed, serving the eager UNet: %s: %s", what, type(exc).__name__, exc)
            self.pipe.unet = self.raw_unet
            self.runner = None
            self.optimisations = [o for o in self.optimisations if o != "torch.compile"]
            self.optimisations.append(f"{what} off (warm-up failed: {type(exc).__name__})")
            return 0.0
        self.warm_shapes = wanted
        if self.cuda_graphs:
            self.optimisations.append("CUDA graphs")
        return seconds

    def release_warm(self) -> None:
        """Drop the warm shapes' graphs / compiled calls (another path serves those shapes now)."""
        if self.runner is not None:
            self.runner.release()
        self.warm_shapes = []
        self.optimisations = [o for o in self.optimisations if o != "CUDA graphs"]

    # -- generation --------------------------------------------------------------------------
    def make_scheduler(self, name: SchedulerName) -> Any:
        import diffusers

        cls_name = SCHEDULER_CLASSES[name]
        if name == "ddim" and self._own_scheduler != "DDIMScheduler":
            log.debug("Model's own scheduler is %s; building DDIM from its config", self._own_scheduler)
        cls = getattr(diffusers, cls_name)
        return cls.from_config(self._scheduler_config)

    def pipeline_for(self, spec: GenerationSpec, *, eager: bool = False) -> Any:
        """The spec's task pipeline over the shared modules with a fresh scheduler.

        ``eager`` bypasses graphs/compile. Image-to-image and inpainting always run the eager UNet: the
        warm shapes were captured and checked for text-to-image only.
        """
        from sd_endpoint.model.pipeline import build_pipeline

        p = self.pipe
        unet = self.raw_unet if eager or spec.task != "text-to-image" else p.unet
        if spec.cache_interval > 1:
            from sd_endpoint.backends.deepcache import DeepCacheUNet

            unet = DeepCacheUNet(self.raw_unet, spec.cache_interval)  # this call's own cache
        return build_pipeline(
            spec.task,
            vae=p.vae,
            text_encoder=p.text_encoder,
            tokenizer=p.tokenizer,
            unet=unet,
            scheduler=self.make_scheduler(spec.scheduler),
        )

    def generators(self, tasks: Sequence[ImageTask]) -> list[Any]:
        # CPU generators: the same seed gives the same initial noise on every device and in any batch.
        return [self._torch.Generator(device="cpu").manual_seed(t.seed) for t in tasks]

    def latents(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
        *,
        eager: bool = False,
    ) -> tuple[Any, Any, list[Any], int]:
        """The denoised latents: (pipeline, latents, generators, steps done). Call under inference_mode."""
        from sd_endpoint.backends.image_tasks import call_arguments

        pipe = self.pipeline_for(spec, eager=eager)
        generators = self.generators(tasks)
        task_args = call_arguments(spec, tasks)
        steps_done = 0
        total = spec.denoising_steps

        def step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal steps_done
            steps_done = i + 1
            if on_step is not None:
                on_step(steps_done, total)
            if cancel is not None:
                cancel.steps_done = steps_done
                cancel.check()  # raises: stops here, before the next UNet call and before the VAE
            return kwargs

        extra: dict[str, Any] = {}
        if spec.scheduler == "ddim":
            extra["eta"] = spec.eta
        do_cfg = spec.guidance_scale > 1
        # Text encoding as __call__ does it, under a lock: a fast tokenizer shared between threads
        # raises "Already borrowed" when two calls change its truncation settings at once.
        with self.lock:
            prompt_embeds, negative_embeds = pipe.encode_prompt(
                [t.prompt for t in tasks],
                self.device,
                1,
                do_cfg,
                negative_prompt=[t.negative_prompt or "" for t in tasks] if do_cfg else None,
            )
        latents = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_end,
            **task_args,
            **extra,
        ).images
        return pipe, latents, generators, steps_done

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        if not tasks:
            return BatchResult([], 0, 0.0)
        if cancel is not None:
            cancel.check()
        started = time.perf_counter()
        with self._torch.inference_mode():
            pipe, latents, generators, steps_done = self.latents(spec, tasks, cancel, on_step)
            images, notes = self.decode(pipe, latents, generators)
        return BatchResult(images, steps_done, time.perf_counter() - started, notes)

    def vae_fp32(self) -> Any:
        """An fp32 copy of the VAE, made on first need (the shared one may be in use by other threads)."""
        with self.lock:
            if self._vae32 is None:
                import copy

                self._vae32 = copy.deepcopy(self.pipe.vae).to(self._torch.float32)
            return self._vae32

    def decode(self, pipe: Any, latents: Any, generators: list[Any]) -> tuple[list[Any], list[list[str]]]:
        """VAE decode as the pipeline does it, with a guard for SD 2.x fp16 NaNs (black images)."""
        torch = self._torch
        vae = pipe.vae
        scaled = latents / vae.config.scaling_factor
        decoded = vae.decode(scaled, return_dict=False, generator=generators)[0]
        notes: list[list[str]] = [[] for _ in range(decoded.shape[0])]
        if decoded.dtype == torch.float16:
            bad = torch.isnan(decoded).flatten(1).any(dim=1)
            for i in bad.nonzero().flatten().tolist():
                # fp16 overflow in the VAE's upsampling turns an image black; decode that one in fp32.
                fixed = self.vae_fp32().decode(scaled[i : i + 1].float(), return_dict=False)[0]
                decoded[i : i + 1] = fixed.to(decoded.dtype)
                self.nan_redecodes += 1
                notes[i].append("decoded again in fp32 after NaNs in the fp16 VAE decode")
                log.warning("NaNs in fp16 VAE decode of image %d; decoded it again in fp32", i)
        images = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(notes))
        return list(images), notes
