"""Checks that turn library tracebacks into messages naming the path and what was expected: a diffusers
folder is a complete SD 2.x pipeline with intact weight files; a single checkpoint is SD 2.x text-to-image
(not SD 1.x, SDXL, an inpainting or depth model, or one component), read without loading its weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model.weights import COMPONENTS, choose_variant, read_header, weight_files

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Where an original-format (LDM) SD 2.x checkpoint keeps each part's weights.
_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_TEXT = "cond_stage_model.model."
_RESBLOCK = re.compile(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


def check_diffusers_folder(path: Path, variant: str | None = None) -> dict[str, Any]:
    """Check the folder is a complete SD 2.x pipeline with intact weight files; return model_index.

    ``variant``: the weight files that will be read (None: the plain ones, or the fp16 ones in a folder
    that holds only those).
    """
    index_file = path / "model_index.json"
    try:
        index: dict[str, Any] = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{index_file}: cannot read it as JSON ({exc}).") from None
    cls = str(index.get("_class_name", ""))
    if "XL" in cls:
        raise ModelLoadError(
            f"{path}: this is an SDXL model ({cls}); sd-endpoint serves Stable Diffusion 2.x "
            "(StableDiffusionPipeline with an OpenCLIP-H text encoder)."
        )
    if cls != "StableDiffusionPipeline":
        raise ModelLoadError(f"{index_file}: expected _class_name 'StableDiffusionPipeline', found {cls!r}.")
    for comp in REQUIRED_COMPONENTS:
        if comp not in index or (path / comp).is_dir() is False:
            raise ModelLoadError(
                f"{path}: the '{comp}' component is missing (expected a '{comp}/' folder listed in model_index.json)."
            )
    unet_cfg = _read_json(path / "unet" / "config.json")
    text_cfg = _read_json(path / "text_encoder" / "config.json")
    _check_family(path, unet_cfg, text_cfg)
    variant = variant or choose_variant(path)
    for comp in COMPONENTS:
        weights = weight_files(path / comp, variant)
        if not weights:
            raise ModelLoadError(
                f"{path / comp}: no weight file (expected diffusion_pytorch_model.safetensors or "
                "model.safetensors, or a .bin)."
            )
        for w in weights:
            if w.suffix == ".safetensors":
                read_header(w)  # corrupt or truncated: a ModelLoadError naming the file
    return index


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(file.read_text())
        return data
    except FileNotFoundError:
        raise ModelLoadError(f"{file}: missing (every component needs its config).") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file}: cannot read it as JSON ({exc}).") from None


def _check_family(path: Path, unet_cfg: dict[str, Any], text_cfg: dict[str, Any]) -> None:
    cross = unet_cfg.get("cross_attention_dim")
    hidden = text_cfg.get("hidden_size")
    act = text_cfg.get("hidden_act")
    if unet_cfg.get("addition_embed_type") == "text_time" or cross == 2048:
        raise ModelLoadError(f"{path}: this looks like SDXL (UNet cross_attention_dim {cross}); expected SD 2.x.")
    if act == "quick_gelu" or (cross == 768 and hidden == 768):
        raise ModelLoadError(
            f"{path}: this looks like Stable Diffusion 1.x (CLIP ViT-L text encoder: hidden_size {hidden}, "
            f"hidden_act {act!r}); sd-endpoint serves SD 2.x, whose OpenCLIP-H encoder has hidden_size 1024 "
            "and hidden_act 'gelu'."
        )
    if cross != hidden:
        raise ModelLoadError(
            f"{path}: the UNet's cross_attention_dim ({cross}) does not match the text encoder's hidden_size "
            f"({hidden}); the components do not belong together."
        )


def checkpoint_family(file: Path, shapes: Mapping[str, tuple[int, ...]], config_dir: Path) -> None:
    """Refuse checkpoints that are not SD 2.x text-to-image, saying what was found instead.

    ``shapes`` maps tensor names to shapes (see ``checkpoint_shapes``); widths are compared with the
    configs in ``config_dir``, the ones the pipeline will be built from.
    """
    _check_parts(file, list(shapes))
    _check_widths(file, shapes, config_dir)


_EXPECTED = "expected an original-format SD 2.x checkpoint such as v2-1_768-ema-pruned.safetensors"


def _check_parts(file: Path, names: list[str]) -> None:
    """The tensor names: SDXL's or SD 1.x's text encoders, a lone diffusers component, missing parts."""
    expected = _EXPECTED

    def has(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in names)

    if has("conditioner.embedders."):
        raise ModelLoadError(
            f"{file}: this is an SDXL checkpoint (found conditioner.embedders.*, SDXL's two text encoders); "
            f"sd-endpoint serves Stable Diffusion 2.x: {expected}."
        )
    if has("cond_stage_model.transformer."):
        raise ModelLoadError(
            f"{file}: this is a Stable Diffusion 1.x checkpoint (found cond_stage_model.transformer.*, OpenAI's "
            f"CLIP ViT-L text encoder); {expected}, whose OpenCLIP-H text encoder is cond_stage_model.model.*."
        )
    parts = {"UNet": _LDM_UNET, "VAE": _LDM_VAE, "text encoder": _LDM_TEXT}
    missing = [f"{part} ({prefix}*)" for part, prefix in parts.items() if not has(prefix)]
    if missing:
        if any(n.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.")) for n in names):
            raise ModelLoadError(
                f"{file}: this holds one model component in diffusers format (tensor names like {names[0]!r}), "
                f"not a whole checkpoint; point SD_ENDPOINT_MODEL at the diffusers folder it came from, or {expected}."
            )
        seen = sorted({n.split(".")[0] for n in names})[:6]
        raise ModelLoadError(
            f"{file}: no {', no '.join(missing)} weights; found tensors under {', '.join(seen) or 'nothing'}; "
            f"{expected}."
        )


def _check_widths(file: Path, shapes: Mapping[str, tuple[int, ...]], config_dir: Path) -> None:
    """The shapes against SD 2.x's configs: UNet input channels, cross-attention and text widths, depth."""
    expected = _EXPECTED
    names = list(shapes)
    unet_cfg = _read_json(config_dir / "unet" / "config.json")
    text_cfg = _read_json(config_dir / "text_encoder" / "config.json")
    in_shape = shapes.get(_LDM_UNET + "input_blocks.0.0.weight")
    want_in = unet_cfg.get("in_channels", 4)
    if in_shape is not None and len(in_shape) == 4 and in_shape[1] != want_in:
        kind = {9: "an inpainting model", 5: "a depth-to-image model", 7: "the x4 upscaler"}.get(in_shape[1], "")
        raise ModelLoadError(
            f"{file}: the UNet takes {in_shape[1]} input channels{f' ({kind})' if kind else ''}; sd-endpoint "
            f"serves text-to-image SD 2.x, whose UNet takes {want_in}."
        )
    context = next((s for n, s in shapes.items() if n.startswith(_LDM_UNET) and n.endswith("attn2.to_k.weight")), None)
    want_context = unet_cfg.get("cross_attention_dim")
    if context is not None and len(context) == 2 and context[1] != want_context:
        hint = " (SD 1.x's width)" if context[1] == 768 else " (SDXL's width)" if context[1] == 2048 else ""
        raise ModelLoadError(
            f"{file}: the UNet's cross-attention reads {context[1]}-wide text features{hint}; SD 2.x reads "
            f"{want_context}-wide OpenCLIP-H features; {expected}."
        )
    width = shapes.get(_LDM_TEXT + "token_embedding.weight")
    if width is not None and len(width) == 2 and width[1] != text_cfg.get("hidden_size"):
        raise ModelLoadError(
            f"{file}: the text encoder is {width[1]} wide; SD 2.x's OpenCLIP-H is {text_cfg.get('hidden_size')}."
        )
    blocks = {int(m.group(1)) for n in names if (m := _RESBLOCK.match(n))}
    want_blocks = int(text_cfg.get("num_hidden_layers", 0))
    if len(blocks) < want_blocks:
        raise ModelLoadError(
            f"{file}: the text encoder has {len(blocks)} transformer blocks; SD 2.x needs at least {want_blocks} "
            "(it reads OpenCLIP-H's penultimate block)."
        )


def checkpoint_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a single-file checkpoint, read without loading its weights."""
    if file.suffix == ".safetensors":
        return {spec.name: spec.shape for spec in read_header(file)}  # a truncated file gets a clear message
    return _ckpt_shapes(file)


def _ckpt_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Unpickle a .ckpt with torch's weights-only unpickler, which refuses any code or class reference.

    diffusers opens the file again the same way (weights_only=True); this first pass turns its refusals
    into messages and lets a .ckpt be checked like a .safetensors. Memory-mapped, so no weight is read.
    """
    import zipfile

    import torch

    zipped = zipfile.is_zipfile(file)  # torch.save's format since 1.6; only it can be memory-mapped
    try:
        data: Any = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # untrusted input: every failure becomes a ModelLoadError
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise ModelLoadError(
                f"{file}: refused: the pickle references {refused.group(1)}, which weights-only unpickling does "
                "not allow (a checkpoint must hold only tensors and plain data; sd-endpoint never runs code from "
                "one). Use the .safetensors version of the checkpoint."
            ) from None
        reason = " ".join(text.split())[:200] or type(exc).__name__
        raise ModelLoadError(
            f"{file}: cannot read it as a PyTorch checkpoint with weights-only unpickling ({reason}); it may be "
            "corrupt or truncated, or not a checkpoint."
        ) from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # PyTorch Lightning keeps the weights under "state_dict"
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: holds a {type(data).__name__}, not a state dict of tensors.")
    return {str(k): tuple(v.shape) for k, v in data.items() if isinstance(v, torch.Tensor)}
