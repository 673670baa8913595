"""One GPU per batch process on a multi-GPU node (Azure's ``max_concurrency_per_instance`` processes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_held_locks: list[Any] = []


def gpu_slot() -> int | None:
    """This process's GPU index, or None when there are fewer than two GPUs."""
    try:
        import torch
    except ImportError:
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        return None
    return claim_gpu_slot(count, Path(os.environ.get("TMPDIR", "/tmp")))


def claim_gpu_slot(count: int, lock_dir: Path) -> int:
    """The first of ``count`` slots no other process holds (an flock held for this process's life).

    When every slot is taken (more processes than GPUs), processes share by pid.
    """
    import fcntl

    for slot in range(count):
        fh = open(lock_dir / f"sd-endpoint-gpu-{slot}.lock", "a")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _held_locks.append(fh)
        return slot
    return os.getpid() % count
