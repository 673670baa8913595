"""Test utility: write a diffusers SD 2.x pipeline as an original-format (LDM) single-file checkpoint.

Stability AI's ``v2-1_768-ema-pruned.{safetensors,ckpt}`` hold one flat state dict in the layout of the
original ``ldm`` code base: the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``
and the OpenCLIP-H text tower under ``cond_stage_model.model.``. Tests need such files without the 5 GB
download, so this module renames a diffusers pipeline's weights into that layout, the inverse of what
``from_single_file`` does when it reads one:

* UNet: diffusers' down/up blocks become the flat ``input_blocks.N`` / ``output_blocks.N`` lists (each
  entry a resnet ``.0`` and optionally a transformer ``.1``; down/upsamplers take their own entry or slot);
  resnet layers get LDM names (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``).
* VAE: ``down_blocks``/``up_blocks`` become ``down.N.block``/``up.N.block`` (the decoder's up list is stored
  in reverse order), the mid-block attention becomes 1x1 convolutions ``q``/``k``/``v``/``proj_out``.
* Text encoder: each layer's separate q/k/v projections are fused into one ``attn.in_proj_weight`` (rows
  q, then k, then v), as ``nn.MultiheadAttention`` stores them. SD 2 conditions on the *penultimate*
  OpenCLIP block, so the diffusers model has one layer fewer than the checkpoint: an extra final
  ``resblocks.N`` (and ``text_projection``) is written that the loader must ignore.

Works on meta tensors too, so the full-size layout can be produced without allocating weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TEXT_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    return f"{_RESNET_NAMES[module]}.{param}"


def _split_param(rest: str) -> tuple[str, str]:
    """'to_out.0.weight' -> ('to_out.0', 'weight')."""
    module, _, param = rest.rpartition(".")
    return module, param


def unet_to_ldm(state: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the LDM ``openaimodel.UNetModel`` layout."""
    n = layers_per_block
    up_with_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, Tensor] = {}

    def put(name: str, value: Tensor) -> None:
        if UNET_PREFIX + name in out:
            raise ValueError(f"two UNet weights map to {name}")
        out[UNET_PREFIX + name] = value

    for key, value in state.items():
        module, param = _split_param(key)
        if module in _UNET_FIXED:
            put(f"{_UNET_FIXED[module]}.{param}", value)
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = 1 + block * (n + 1) + layer
            put(
                f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}",
                value,
            )
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            # The downsampler is an input block of its own, after the block's layers.
            put(f"input_blocks.{(int(m.group(1)) + 1) * (n + 1)}.0.op.{m.group(2)}", value)
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            put(f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2))}", value)
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            put(f"middle_block.1.{m.group(1)}", value)
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            # Up blocks have one layer more than down blocks (they also take the skip of the downsampler).
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = block * (n + 1) + layer
            put(
                f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}",
                value,
            )
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            # The upsampler shares the block's last entry, after its transformer when there is one.
            block = int(m.group(1))
            slot = 2 if block in up_with_attention else 1
            put(f"output_blocks.{block * (n + 1) + n}.{slot}.conv.{m.group(2)}", value)
        else:
            raise ValueError(f"no LDM name for UNet weight {key}")
    return out


def vae_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the LDM ``autoencoder.AutoencoderKL`` layout."""
    up_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            name = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
            name = key
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            name = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # LDM lists the decoder's levels from the highest resolution up; diffusers from the lowest.
            level = up_blocks - 1 - int(m.group(1))
            name = f"decoder.up.{level}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            name = f"decoder.up.{up_blocks - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)", key):
            module = _VAE_ATTN_NAMES[m.group(2)]
            name = f"{m.group(1)}.mid.attn_1.{module}.{m.group(3)}"
            if module != "norm" and value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        else:
            raise ValueError(f"no LDM name for VAE weight {key}")
        out[VAE_PREFIX + name] = value
    return out


def text_encoder_to_ldm(state: Mapping[str, Tensor], *, extra_final_block: bool = True) -> dict[str, Tensor]:
    """Rename a diffusers/transformers CLIPTextModel state dict to OpenCLIP's text tower layout."""
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    fused: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value  # a bare parameter in OpenCLIP, not an nn.Embedding
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m.group(1)}.{_TEXT_LAYER_NAMES[m.group(2)]}.{m.group(3)}"] = value
        elif key == "embeddings.position_ids":
            continue  # a buffer transformers recomputes
        else:
            raise ValueError(f"no OpenCLIP name for text encoder weight {key}")
    for (layer, param), qkv in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    width = out["token_embedding.weight"].shape[1]
    if extra_final_block:
        # OpenCLIP's last block, which SD 2 skips ("penultimate"). Values differ from every used block, so a
        # loader that wrongly used it would change the images.
        last = max(layer for layer, _ in fused)
        prefix = f"transformer.resblocks.{last}."
        for key in [k for k in out if k.startswith(prefix)]:
            out[f"transformer.resblocks.{last + 1}." + key.removeprefix(prefix)] = out[key].clone().neg()
        # (width, embed_dim) in OpenCLIP; 1024 x 1024 for ViT-H. SD 2 does not use it.
        out["text_projection"] = torch.eye(width, dtype=out["token_embedding.weight"].dtype).to(
            out["token_embedding.weight"].device
        )
    return {TEXT_PREFIX + k: v for k, v in out.items()}


def _schedule_buffers() -> dict[str, Tensor]:
    """The DDPM buffers the LDM wrapper saves with every checkpoint (SD's scaled-linear betas)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return {
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod.float(),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
    }


def pipeline_to_ldm(pipe: Any, *, extra_final_block: bool = True) -> dict[str, Tensor]:
    """The whole pipeline (UNet, VAE, text encoder) as one LDM state dict, plus the schedule buffers."""
    state = unet_to_ldm(pipe.unet.state_dict(), int(pipe.unet.config.layers_per_block))
    state.update(vae_to_ldm(pipe.vae.state_dict()))
    state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), extra_final_block=extra_final_block))
    state.update(_schedule_buffers())
    return state


def save_safetensors(state: Mapping[str, Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def save_ckpt(state: Mapping[str, Tensor], path: Path, **extra: Any) -> Path:
    """A PyTorch-Lightning-style .ckpt: the weights under "state_dict", beside plain metadata."""
    torch.save({"global_step": 110_000, **extra, "state_dict": dict(state)}, str(path))
    return path


def write_sparse_safetensors(shapes: Mapping[str, tuple[int, ...]], path: Path, dtype: str = "F16") -> Path:
    """A valid safetensors file of all-zero tensors, written sparse: gigabytes long, no disk or memory used."""
    import json
    import math
    import struct

    itemsize = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def full_size_ldm_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of a full-size SD 2.1 LDM checkpoint, from the packaged configs, without weights."""
    import json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_endpoint.model.demo import sd21_config_dir

    root = sd21_config_dir()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((root / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((root / "vae" / "config.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig.from_json_file(str(root / "text_encoder" / "config.json")))

    class _Meta:  # what pipeline_to_ldm reads from a pipeline
        pass

    pipe = _Meta()
    pipe.unet, pipe.vae, pipe.text_encoder = unet, vae, text  # type: ignore[attr-defined]
    return {k: tuple(v.shape) for k, v in pipeline_to_ldm(pipe).items()}
