"""The UNet stand-ins (UNetRunner, DeepCacheUNet) answer in the UNet's own output format."""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from sd_endpoint.backends.unet_standin import UNetStandIn


def test_output_is_the_unets_dataclass_or_a_one_tuple() -> None:
    sample = torch.zeros(1)
    out = UNetStandIn.unet_output(sample, return_dict=True)
    assert isinstance(out, UNet2DConditionOutput) and out.sample is sample
    assert UNetStandIn.unet_output(sample, return_dict=False) == (sample,)
