"""A UNet stand-in that serves warm shapes fast: a captured CUDA graph or a torch.compile'd forward.

The pipeline calls ``unet(latents, t, encoder_hidden_states=..., return_dict=False)`` once per denoising
step. ``UNetRunner`` looks at the input shapes: a shape warmed at start-up replays its CUDA graph (or runs
the compiled module), any other shape runs the plain eager module - so a request of an unusual size never
triggers a multi-second capture or recompilation at request time, and never fails.

CUDA graphs are keyed by shape because a graph replays fixed addresses: each warm shape has its own
graph with static input and output buffers, all in one shared memory pool. Replays are serialised by a
lock (static buffers are shared between threads) and the output is cloned before the lock is released,
which is also what makes sharing one pool between graphs safe. DeepSpeed's own wrappers (DSUNet) capture
once, for the first shape they see, and are not thread-safe; this replaces them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sd_endpoint.backends.unet_standin import UNetStandIn

log = logging.getLogger(__name__)

ShapeKey = tuple[tuple[int, ...], tuple[int, ...]]  # (sample shape, encoder_hidden_states shape)
# Keyword arguments the SD 2.1 pipeline passes as None; anything else goes to the eager module.
_NONE_KWARGS = ("timestep_cond", "added_cond_kwargs", "cross_attention_kwargs", "class_labels", "attention_mask")


def unet_inputs_for(
    unet: Any, height: int, width: int, batch: int, context_len: int = 77
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The UNet input shapes for a batch of images with classifier-free guidance (2 x batch rows)."""
    scale = 8  # SD's VAE factor; the latent is height/8 x width/8
    cfg = unet.config
    return (
        (2 * batch, int(cfg.in_channels), height // scale, width // scale),
        (2 * batch, context_len, int(cfg.cross_attention_dim)),
    )


class _Graph:
    def __init__(self, graph: Any, sample: Any, timestep: Any, context: Any, output: Any) -> None:
        self.graph = graph
        self.sample = sample
        self.timestep = timestep
        self.context = context
        self.output = output


class UNetRunner(UNetStandIn):
    """Wraps a UNet; looks like one to the pipeline (config, dtype, device, in_channels)."""

    def __init__(
        self,
        unet: Any,
        *,
        fast: Callable[..., Any] | None = None,
        strict: bool = False,
        label: str = "unet",
    ) -> None:
        super().__init__(unet)
        # `fast` (e.g. torch.compile(unet)) runs only the warm shapes; it must not be registered as a
        # submodule, or the UNet's weights would appear twice in state_dict.
        self._fast = fast
        self.strict = strict  # the DeepSpeed path: no eager runs after capture (see deepspeed_backend)
        self.label = label
        self._warm: set[ShapeKey] = set()
        self._graphs: dict[ShapeKey, _Graph] = {}
        self._lock = threading.Lock()
        self._pool: Any = None

    # -- what the pipeline reads (besides UNetStandIn's) -----------------------------------------
    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def warm_keys(self) -> frozenset[ShapeKey]:
        return frozenset(self._warm | set(self._graphs))

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def handles(self, key: ShapeKey) -> bool:
        return key in self._graphs or key in self._warm

    # -- calls -------------------------------------------------------------------------------
    def forward(
        self, sample: Any, timestep: Any, encoder_hidden_states: Any = None, return_dict: bool = True, **kwargs: Any
    ) -> Any:
        plain = encoder_hidden_states is not None and all(kwargs.get(k) is None for k in _NONE_KWARGS)
        plain = plain and set(kwargs) <= set(_NONE_KWARGS)
        key: ShapeKey | None = None
        if plain:
            key = (tuple(sample.shape), tuple(encoder_hidden_states.shape))
        scalar_t = not torch.is_tensor(timestep) or timestep.ndim == 0
        if key is not None and key in self._graphs and scalar_t:
            out = self._replay(self._graphs[key], sample, timestep, encoder_hidden_states)
        elif key is not None and key in self._warm and self._fast is not None and scalar_t:
            # The compiled graph was traced with a float32 timestep: pass the same, or dynamo would compile
            # again for the scheduler's int64 one, at request time. Exact: the UNet embeds t as float32.
            t = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
            out = self._fast(sample, t, encoder_hidden_states, return_dict=False)[0]
        else:
            if self.strict:
                raise RuntimeError(
                    f"{self.label}: shape {None if key is None else key} was not captured at start-up; "
                    "the router should have sent it to the diffusers path"
                )
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)
        return self.unet_output(out, return_dict)

    def _call(self, sample: Any, timestep: Any, context: Any) -> Any:
        fn = self._fast if self._fast is not None else self.unet
        return fn(sample, timestep, context, return_dict=False)[0]

    def _replay(self, g: _Graph, sample: Any, timestep: Any, context: Any) -> Any:
        with self._lock:
            g.sample.copy_(sample)
            g.timestep.copy_(torch.as_tensor(timestep))
            g.context.copy_(context)
            g.graph.replay()
            return g.output.clone()

    def release(self) -> None:
        """Forget every warm shape (their graphs' memory goes back to the allocator)."""
        with self._lock:
            self._graphs.clear()
            self._warm.clear()
            self._pool = None

    def time_call(self, key: ShapeKey, repeats: int = 5) -> float:
        """Median seconds of one forward at a warm shape, as requests will run it (graph or compiled)."""
        device, dtype = self.unet.device, self.unet.dtype
        times = []
        with torch.inference_mode():
            sample, timestep, context = self.dummy(key, device, dtype)
            for _ in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                self(sample, timestep, context, return_dict=False)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - started)
        return sorted(times[1:])[repeats // 2]

    # -- start-up ----------------------------------------------------------------------------
    def warm(self, keys: Iterable[ShapeKey], *, graphs: bool) -> float:
        """Run (and with ``graphs`` capture) each shape once; returns the seconds it took.

        Every shape runs eagerly before any capture, largest batch first: kernels that size a global
        workspace on first use (DeepSpeed's) then never reallocate it under a captured graph.
        """
        started = time.perf_counter()
        ordered = sorted(set(keys), key=lambda k: (-k[0][0], k))
        device, dtype = self.unet.device, self.unet.dtype
        with torch.inference_mode():
            inputs = {k: self.dummy(k, device, dtype) for k in ordered}
            for k in ordered:  # compile / autotune / allocate workspaces
                self._call(*inputs[k])
                self._warm.add(k)
            if graphs:
                if device.type != "cuda":
                    raise RuntimeError(f"CUDA graphs need a CUDA device, not {device}")
                self._pool = torch.cuda.graph_pool_handle()
                for k in ordered:
                    self._graphs[k] = self._capture(*inputs[k])
                torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        log.info(
            "%s: warmed %d shape(s)%s in %.1f s",
            self.label,
            len(ordered),
            " as CUDA graphs" if graphs else "",
            seconds,
        )
        return seconds

    @staticmethod
    def dummy(key: ShapeKey, device: Any, dtype: Any) -> tuple[Any, Any, Any]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        sample = torch.randn(key[0], generator=gen).to(device=device, dtype=dtype)
        context = torch.randn(key[1], generator=gen).to(device=device, dtype=dtype)
        timestep = torch.tensor(500.0, device=device)
        return sample, timestep, context

    def _capture(self, sample: Any, timestep: Any, context: Any) -> _Graph:
        stream = torch.cuda.Stream(device=sample.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(sample.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # cuBLAS/cuDNN handles and autotuning happen outside the capture
                self._call(sample, timestep, context)
        torch.cuda.current_stream(sample.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._call(sample, timestep, context)
        return _Graph(graph, sample, timestep, context, output)
