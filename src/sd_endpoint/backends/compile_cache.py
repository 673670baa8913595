"""A persistent ``torch.compile`` cache that is only ever used by the GPU, torch and model that filled it.

Inductor's FX-graph and autograd caches, and Triton's kernel cache, live under one folder
(``SD_ENDPOINT_COMPILE_CACHE``, default ``<SD_ENDPOINT_CACHE_DIR>/compile``; on Azure a folder next to the
model or on a mounted volume). The first start fills it; a restart finds its compiled graphs there instead
of compiling again. A ``key.json`` in the folder records what filled it: the GPU model and compute
capability, torch / Triton / CUDA versions, the precision and a fingerprint of the UNet's config and
source. A folder with another key is emptied and rebuilt, never used: compiled kernels are tuned for one
GPU and one torch, and frozen weights (CPU) belong to one model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEY_FILE = "key.json"


@dataclass(frozen=True)
class CacheState:
    path: Path
    state: str  # "warm" (key matched), "new" (empty) or "rebuilt" (another key was there)
    key: dict[str, str]

    def describe(self) -> str:
        return f"compile cache {self.path} ({self.state})"


def cache_key(unet: Any, *, source: str, precision: str) -> dict[str, str]:
    """What a compiled artefact depends on, beyond the graph itself (which inductor hashes)."""
    import importlib.metadata

    import torch

    device = unet.device
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    else:
        gpu = "cpu"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    config = json.dumps(dict(unet.config), sort_keys=True, default=str)
    model = hashlib.sha256(f"{source}\n{config}\n{unet.dtype}".encode()).hexdigest()[:16]
    return {
        "device": gpu,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton,
        "precision": precision,
        "model": model,
    }


def open_cache(root: Path, key: dict[str, str]) -> CacheState:
    """Point inductor and Triton at ``root``; empty it first when another GPU/torch/model filled it."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / KEY_FILE
    state = "new"
    if stamp.is_file():
        try:
            found = json.loads(stamp.read_text())
        except (OSError, ValueError):
            found = None
        if found == key:
            state = "warm"
        else:
            differs = sorted(k for k in key if not isinstance(found, dict) or found.get(k) != key[k])
            log.warning("Compile cache %s was filled for another %s; rebuilding it", root, ", ".join(differs))
            for child in root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            state = "rebuilt"
    elif any(root.iterdir()):
        # Files without a key: nobody can say what filled them.
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        state = "rebuilt"
    stamp.write_text(json.dumps(key, sort_keys=True))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    return CacheState(root, state, key)
