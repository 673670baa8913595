"""The built-in demo model: SD 2.1's architecture and scheduler with random weights.

The tiny variant keeps every architectural trait of SD 2.1 that the serving path depends on
(v-prediction DDIM, OpenCLIP-style gelu text encoder, linear-projection cross-attention with upcast
attention, an 8x VAE with 4 latent channels, the real CLIP tokenizer with ``!`` padding, 768x768 default
output) at a size that generates in about a second on a laptop CPU. Its images are noise.
The full-size variant is the real 865.9M-parameter UNet, 340M text encoder and 84M VAE, for benchmarks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from sd_endpoint.model.pipeline import build_pipeline
from sd_endpoint.model.tokenizer import cached_tokenizer_dir

log = logging.getLogger(__name__)

DEMO_VERSION = "1"  # bump when the demo architecture changes, so caches are rebuilt

# Latent 96x96 -> 768x768 pixels, SD 2.1's native size.
TINY_UNET: dict[str, Any] = {
    "sample_size": 96,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    # Attention only at the lowest resolution (24x24 latents): at 96x96 it alone would take 40 s a request.
    "block_out_channels": [8, 16, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "attention_head_dim": [1, 1, 2],
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "upcast_attention": True,
    "norm_num_groups": 8,
}
# Four blocks give SD's VAE scale factor of 8; narrow channels keep the 768px decode cheap.
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [8, 8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
# OpenCLIP-H's traits at toy width: gelu (not CLIP's quick_gelu), 77 positions, SD 2.1's special ids.
TINY_TEXT: dict[str, Any] = {
    "vocab_size": 49_408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def sd21_config_dir() -> Path:
    """SD 2.1's diffusers config files, shipped as package data (no network needed)."""
    return Path(str(resources.files("sd_endpoint.model") / "sd21_config"))


def _read_config(component: str) -> dict[str, Any]:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    data: dict[str, Any] = json.loads((sd21_config_dir() / component / name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build_demo_pipeline(*, full_size: bool = False, seed: int = 0, cache_dir: Path | None = None) -> Any:
    """A StableDiffusionPipeline with SD 2.1's architecture (or the tiny copy) and random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet_cfg = _read_config("unet") if full_size else TINY_UNET
    vae_cfg = _read_config("vae") if full_size else TINY_VAE
    text_cfg = _read_config("text_encoder") if full_size else TINY_TEXT
    for key in ("architectures", "torch_dtype", "transformers_version", "dropout", "initializer_factor"):
        text_cfg.pop(key, None)
    text_cfg.pop("model_type", None)
    tok_dir = cached_tokenizer_dir(cache_dir or Path(tempfile.gettempdir()) / "sd-endpoint-cache")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!", model_max_length=77)
    return build_pipeline(
        "text-to-image",
        vae=AutoencoderKL(**vae_cfg),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_cfg),
        scheduler=DDIMScheduler.from_config(_read_config("scheduler")),
    )


def _save_quietly(pipe: Any, out_dir: Path) -> None:
    """save_pretrained without transformers' one-step "Writing model shards" progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def write_demo_model(out_dir: Path, *, full_size: bool = False, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Save the demo pipeline as a diffusers folder (fp16 safetensors for the full-size one)."""
    import torch

    pipe = build_demo_pipeline(full_size=full_size, seed=seed, cache_dir=cache_dir)
    if full_size:
        # Real deployments ship fp16 weights; the cold-start benchmark loads exactly those bytes.
        pipe.to(torch.float16)
    out_dir = Path(out_dir)
    _save_quietly(pipe, out_dir)
    # transformers 5 writes only tokenizer.json; keep vocab.json/merges.txt too so transformers 4 loads it.
    tok_src = cached_tokenizer_dir(cache_dir or Path(tempfile.gettempdir()) / "sd-endpoint-cache")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok_src / name, out_dir / "tokenizer" / name)
    (out_dir / "DEMO_MODEL.txt").write_text(
        "Random weights with the SD 2.1 architecture"
        + (" (full size)" if full_size else " (tiny)")
        + ": images are noise. Made by `sd-endpoint demo-model`.\n"
    )
    return out_dir


def cached_demo_model(cache_dir: Path) -> Path:
    """The tiny demo model, built once into the cache folder."""
    target = cache_dir / f"demo-model-v{DEMO_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("Building the demo model once into %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache_dir))
    try:
        write_demo_model(tmp / "model", cache_dir=cache_dir)
        try:
            os.rename(tmp / "model", target)
        except OSError:  # built concurrently by another worker
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
