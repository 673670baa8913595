"""Helpers shared by the benchmarks: the machine, the full-size model, tables."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run from a checkout without installing the package; the root makes tests.support (ports, servers) importable.
for _path in (ROOT, ROOT / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-endpoint"


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, torch version and GPU, for every benchmark's header."""
    import torch

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    ram_gb = 0.0
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags]
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16 ISA": ", ".join(bf16) or "none",
        "ram_gib": round(ram_gb, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": "none",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    try:
        import diffusers
        import transformers

        info["diffusers"] = diffusers.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def print_machine(info: dict[str, Any] | None = None) -> None:
    info = info or machine()
    print("Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))


def full_size_model(path: Path | None, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The full-size SD 2.1 architecture with random weights in fp16 safetensors, built once (~2.6 GB)."""
    from sd_endpoint.model.demo import write_demo_model

    target = path or cache_dir / "bench" / "sd21-full-fp16"
    if (target / "model_index.json").is_file():
        return target
    print(f"Building the full-size random SD 2.1 model into {target} (once; ~2.6 GB) ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".full-", dir=target.parent))
    write_demo_model(tmp / "model", full_size=True, cache_dir=cache_dir)
    (tmp / "model").rename(target)
    tmp.rmdir()
    return target


def weight_files(folder: Path) -> list[Path]:
    """The weight files the loader reads from this diffusers folder (the package's own finder)."""
    from sd_endpoint.model.weights import COMPONENTS, choose_variant
    from sd_endpoint.model.weights import weight_files as component_files

    variant = choose_variant(folder)
    return [f for c in COMPONENTS for f in component_files(folder / c, variant)]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (the README pastes these as they are)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
