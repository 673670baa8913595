"""CPU thread policy for the processes we start: OpenMP threads that sleep while they wait, and, where several
server workers share one host, each worker's share of the cores.

Why: PyTorch's OpenMP threads spin at every parallel-region barrier by default. When other processes hold the
cores, a spinning thread burns the time slice that the thread it waits for needs, so a small model (many short
ops, many barriers) slows down far beyond its fair share of the CPU: measured on a 2-core machine with four
busy processes beside it, 9-26x its idle time where the fair share is 3x (benchmarks/load.py). A passive wait
policy brings it back to about the fair share. libgomp reads the policy once, when torch loads it, so it must
be set before anything imports torch; our entry points (the CLI, score.py, the batch worker) call
``prefer_passive_waits()`` first. A value the user set (``OMP_WAIT_POLICY``) always wins.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def prefer_passive_waits() -> bool:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE for this process; False when torch is already loaded (too late)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_threads(workers: int, cores: int | None = None) -> int | None:
    """Intra-op threads for one of ``workers`` processes sharing the cores; None: leave torch's default.

    ``OMP_NUM_THREADS``, when set, is the user's choice and wins.
    """
    if workers <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (cores or available_cores()) // workers)


def share_cores_between_workers(workers: int) -> int | None:
    """Give this worker its share of the cores (``torch.set_num_threads``); returns the count it set."""
    threads = worker_threads(workers)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        log.info(
            "CPU: %d intra-op thread(s) for this worker (%d workers share %d cores)",
            threads,
            workers,
            available_cores(),
        )
    return threads
