"""GPU tests (``@pytest.mark.gpu``) are deselected, not skipped, where torch sees no CUDA device.

``benchmarks/gpu_check.sh`` runs them on a GPU machine with ``-m gpu``.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    config.hook.pytest_deselected(items=gpu_items)
    items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
