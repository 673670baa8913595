"""Which device and dtype the model runs on (SD_ENDPOINT_DEVICE / SD_ENDPOINT_DTYPE, or chosen from the
hardware), with the reason, which start-up logs and /ready reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.settings import Settings


@dataclass(frozen=True)
class Placement:
    device: str
    dtype_name: str
    reason: str


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: where oneDNN runs bf16 matmuls natively (Sapphire Rapids, Zen 4 and later)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def choose_placement(settings: Settings) -> Placement:
    import torch

    reasons = []
    if settings.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reasons.append("CUDA available" if device == "cuda" else "no CUDA device")
    else:
        device = settings.device
        reasons.append("SD_ENDPOINT_DEVICE")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"SD_ENDPOINT_DEVICE={device}: torch sees no CUDA device.")
    if settings.dtype != "auto":
        dtype = settings.dtype
        reasons.append("SD_ENDPOINT_DTYPE")
    elif device.startswith("cuda"):
        dtype = "float16"
        reasons.append("fp16 on CUDA")
    elif cpu_has_fast_bf16():
        dtype = "bfloat16"
        reasons.append("CPU has native bf16 (AMX/AVX512-BF16)")
    else:
        dtype = "float32"
        reasons.append("CPU without fast bf16")
    return Placement(device, dtype, ", ".join(reasons))
