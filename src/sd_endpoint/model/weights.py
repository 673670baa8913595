"""The weight files of a diffusers folder: which files hold a component's weights (and in which variant),
and what a safetensors file holds, read from its header alone and checked against the file's size.

Used by the checks (``checks.py``), the loader's variant choice (``loading.py``) and the fast loader
(``fast_load.py``), so all three agree on what will be read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from sd_endpoint.errors import ModelLoadError

COMPONENTS = ("unet", "vae", "text_encoder")  # the components with weights
# File stems per component: diffusers' names, and transformers' for the text encoder.
_STEMS = {"text_encoder": {"safetensors": "model", "bin": "pytorch_model"}}
_DIFFUSERS_STEMS = {"safetensors": "diffusion_pytorch_model", "bin": "diffusion_pytorch_model"}
_MAX_HEADER_BYTES = 100_000_000
SAFETENSORS_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    stored: str  # the safetensors dtype code, e.g. "F16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def dtype(self) -> str | None:
        """The torch dtype name, or None for a dtype torch has no name for here."""
        return SAFETENSORS_DTYPES.get(self.stored)


def read_header(file: Path) -> list[TensorSpec]:
    """The tensors of a safetensors file in file order, from its JSON header; a ModelLoadError names a
    corrupt or truncated file."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"header length {header_len} is past the end of the file")
            header = json.loads(fh.read(header_len))
        base = 8 + header_len
        specs = []
        for name, info in header.items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                specs.append(TensorSpec(name, str(info["dtype"]), tuple(info["shape"]), base + int(a), base + int(b)))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{file}: not a valid safetensors file ({exc}); it may be corrupt or truncated.") from None
    end = max((s.end for s in specs), default=base)
    if end > size:
        raise ModelLoadError(f"{file}: truncated: the header describes {end} bytes but the file has {size}.")
    return sorted(specs, key=lambda s: s.start)


def weight_files(component_dir: Path, variant: str | None) -> list[Path]:
    """The files holding one component's weights: a safetensors file or the shards its index names, else
    the same in .bin (which only from_pretrained reads). Empty when there are none for this variant."""
    for ext in ("safetensors", "bin"):
        stem = _STEMS.get(component_dir.name, _DIFFUSERS_STEMS)[ext]
        single = component_dir / (f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}")
        if single.is_file():
            return [single]
        index = component_dir / (f"{stem}.{ext}.index.{variant}.json" if variant else f"{stem}.{ext}.index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise ModelLoadError(f"{index}: cannot read its weight_map ({exc}).") from None
            return [component_dir / s for s in shards]
    return []


def choose_variant(folder: Path, dtype_name: str | None = None) -> str | None:
    """Which weight files to read: "fp16" where every component has them and the model runs in fp16 (half
    the bytes of fp32 files; the values are the same after the cast), or where the folder has only those;
    otherwise None, the plain files."""
    plain = all(weight_files(folder / c, None) for c in COMPONENTS)
    fp16 = all(weight_files(folder / c, "fp16") for c in COMPONENTS)
    return "fp16" if fp16 and (dtype_name == "float16" or not plain) else None
