"""The one place that changes process-wide torch settings, called once before the backends are built.

Backend constructors change nothing global. This step:

* silences the two library loggers that print the text of over-long prompts (prompts stay out of logs);
* on CUDA turns on cuDNN autotuning (shapes repeat, each conv is tuned once);
* resolves ``SD_ENDPOINT_COMPILE=auto`` (on with CUDA, off on CPU, where compiling the full UNet takes
  minutes per warm shape for a 1.9x gain: README, Performance) and, when compiling, opens the persistent
  compile cache (compile_cache.py) and, on CPU, turns on inductor's weight freezing (oneDNN gets pre-packed
  weights);
* applies ``SD_ENDPOINT_PRECISION`` (precision.py) before anything is compiled or captured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sd_endpoint.backends.compile_cache import CacheState
from sd_endpoint.settings import Settings

log = logging.getLogger(__name__)

# Both log the text of over-long prompts at WARNING.
PROMPT_LOGGERS = (
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "transformers.tokenization_utils_base",
)


@dataclass
class Prepared:
    compile: bool
    cache: CacheState | None = None
    notes: list[str] = field(default_factory=list)  # for the backend's "optimisations"


def compile_wanted(setting: str, device_type: str) -> bool:
    if setting == "auto":
        return device_type == "cuda"
    return setting == "on"


def quiet_prompt_loggers() -> None:
    for name in PROMPT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def prepare(settings: Settings, pipe: Any, *, source: str = "") -> Prepared:
    """Configure torch for serving ``pipe`` as the settings ask; returns what the backend needs to know."""
    import torch

    quiet_prompt_loggers()
    unet = pipe.unet
    device_type = unet.device.type
    prepared = Prepared(compile=compile_wanted(settings.compile, device_type))
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True
    if settings.precision == "fp8":
        from sd_endpoint.backends.precision import to_fp8

        prepared.notes.append(f"fp8 linear layers ({to_fp8(unet)}, per-row scales)")
    if prepared.compile:
        import torch._inductor.config as inductor_config

        from sd_endpoint.backends.compile_cache import cache_key, open_cache

        if device_type == "cpu":
            inductor_config.freezing = True  # weights become constants: pre-packed bf16 weights for oneDNN
        root = settings.compile_cache or settings.cache_dir / "compile"
        prepared.cache = open_cache(root, cache_key(unet, source=source, precision=settings.precision))
        prepared.notes.append(prepared.cache.describe())
        log.info("torch.compile for the warm shapes; %s", prepared.cache.describe())
    return prepared
