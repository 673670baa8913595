"""What a module put in the pipeline's ``unet`` slot must look like to the pipeline.

``UNetRunner`` (warm shapes as CUDA graphs or compiled) and ``DeepCacheUNet`` (per-request feature reuse)
both wrap a diffusers ``UNet2DConditionModel``: the pipeline reads the wrapped UNet's config, dtype and
device through them, and gets its output in the UNet's own format.
"""

from __future__ import annotations

from typing import Any

import torch


class UNetStandIn(torch.nn.Module):
    """Holds the wrapped UNet as ``self.unet`` and answers what the pipeline reads from it."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> Any:
        return self.unet.dtype

    @property
    def device(self) -> Any:
        return self.unet.device

    @staticmethod
    def unet_output(sample: Any, return_dict: bool) -> Any:
        """``sample`` as the UNet returns it: its output dataclass, or a 1-tuple with ``return_dict=False``."""
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=sample)
        return (sample,)
