"""``SD_ENDPOINT_PRECISION=fp8``: the UNet's linear layers in fp8 through torchao, on GPUs that have fp8.

torchao's ``Float8DynamicActivationFloat8WeightConfig`` with per-row scales: each weight row and each
activation row gets its own scale (activations scaled at run time), and the GEMM runs on the fp8 tensor
cores through ``torch._scaled_mm``, which inductor fuses with the scaling when the UNet is compiled
(SD_ENDPOINT_COMPILE). Only layers whose both dimensions divide by 16 (``_scaled_mm``'s requirement) are
converted, and not the timestep embedding (a 1-row GEMM: no time to win, precision to lose).
Convolutions stay fp16: torchao has no fp8 convolution.

fp8 tensor cores exist from compute capability 8.9 (Ada: L4, L40S; Hopper: H100, H200); an A100 (8.0) has
none, and neither does a CPU: there fp8 is refused at start-up with a message saying so, rather than run
through a slow emulation that would defeat its purpose.
"""

from __future__ import annotations

import logging
from typing import Any

from sd_endpoint.errors import ConfigError

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)


def fp8_blocker(device: Any) -> str | None:
    """Why fp8 cannot run on ``device`` (a torch.device), or None."""
    import torch

    if device.type != "cuda":
        return (
            f"SD_ENDPOINT_PRECISION=fp8 needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+: "
            f"L4, L40S, H100, H200); the model is on {device}. Use SD_ENDPOINT_PRECISION=fp16."
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"SD_ENDPOINT_PRECISION=fp8: {name} (compute capability {major}.{minor}) has no fp8 tensor cores "
            "(they start at 8.9: L4, L40S, H100, H200). Use SD_ENDPOINT_PRECISION=fp16."
        )
    return None


def fp8_layer(module: Any, name: str) -> bool:
    """Which UNet modules become fp8: linear layers _scaled_mm can take, not the timestep embedding."""
    import torch

    if not isinstance(module, torch.nn.Linear) or name.startswith(("time_embedding", "time_proj")):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def to_fp8(unet: Any) -> int:
    """Convert the UNet's eligible linear layers in place; returns how many. Raises ConfigError if refused."""
    blocked = fp8_blocker(unet.device)
    if blocked is not None:
        raise ConfigError(blocked)
    return convert(unet)


def convert(unet: Any) -> int:
    """The conversion itself (no hardware check; tests run it on the CPU)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ConfigError(f"SD_ENDPOINT_PRECISION=fp8 needs torchao (pip install 'sd-endpoint[gpu]'): {exc}") from exc
    chosen = [name for name, module in unet.named_modules() if fp8_layer(module, name)]
    quantize_(
        unet,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
        filter_fn=fp8_layer,
    )
    log.info("fp8: %d of the UNet's linear layers converted (per-row scales)", len(chosen))
    return len(chosen)
