"""DeepCache for diffusers' ``UNet2DConditionModel``: reuse the UNet's deep features between steps.

Per request (``cache_interval`` = N > 1): every N-th denoising step runs the whole UNet and keeps the
features entering its last up block; the steps between run only the shallow path - ``conv_in``, the first
down block, and the last up block fed with the kept deep features plus this step's skip connections - and
the output convolution. Adjacent steps' deep features change slowly, so the image moves little while most
of the UNet's FLOPs are skipped (the method of Ma et al., "DeepCache", CVPR 2024, uniform schedule, the
shallowest branch). The maintained implementation (the ``DeepCache`` package) patches diffusers' internals
of 2023 releases; this is the same idea over the public module structure of diffusers 0.42.

A ``DeepCacheUNet`` is made per generation call (it holds that call's step counter and features), so
concurrent requests never share a cache. It wraps the eager UNet: a captured CUDA graph runs the whole
network every step and cannot hand out the features in between.
"""

from __future__ import annotations

from typing import Any

from sd_endpoint.backends.unet_standin import UNetStandIn
from sd_endpoint.jobs import MAX_CACHE_INTERVAL


class DeepCacheUNet(UNetStandIn):
    """Looks like the UNet to the pipeline; runs the full network every ``interval`` calls."""

    def __init__(self, unet: Any, interval: int) -> None:
        super().__init__(unet)
        if not 1 <= interval <= MAX_CACHE_INTERVAL:
            raise ValueError(f"cache_interval must be 1 to {MAX_CACHE_INTERVAL}, got {interval}")
        self.interval = interval
        self.calls = 0
        self.full_calls = 0
        self._deep: Any = None  # the input of up_blocks[-1] at the last full step

    def forward(
        self, sample: Any, timestep: Any, encoder_hidden_states: Any = None, return_dict: bool = True, **kwargs: Any
    ) -> Any:
        full = self._deep is None or self.calls % self.interval == 0
        self.calls += 1
        if full:
            out = self._full(sample, timestep, encoder_hidden_states, **kwargs)
        else:
            out = self._shallow(sample, timestep, encoder_hidden_states)
        return self.unet_output(out, return_dict)

    def _full(self, sample: Any, timestep: Any, context: Any, **kwargs: Any) -> Any:
        kept: list[Any] = []

        def keep(_module: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
            kept.append(args[0] if args else kw["hidden_states"])

        handle = self.unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = self.unet(sample, timestep, context, return_dict=False, **kwargs)[0]
        finally:
            handle.remove()
        self._deep = kept[-1]
        self.full_calls += 1
        return out

    def _shallow(self, sample: Any, timestep: Any, context: Any) -> Any:
        """UNet2DConditionModel.forward's steps 1-2, the first down block, the last up block, the output."""
        unet = self.unet
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        first = unet.down_blocks[0]
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            _, res = first(hidden_states=hidden, temb=emb)
        last = unet.up_blocks[-1]
        # The last up block's skips are conv_in's output and the first down block's per-layer outputs
        # (its downsampler's output feeds the block above).
        skips = ((hidden, *res))[: len(last.resnets)]
        if getattr(last, "has_cross_attention", False):
            out = last(
                hidden_states=self._deep,
                temb=emb,
                res_hidden_states_tuple=skips,
                encoder_hidden_states=context,
            )
        else:
            out = last(hidden_states=self._deep, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)
