"""Start-up warm-up: small on a CPU (lazy initialisation does not depend on the size), native on a GPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from sd_endpoint.jobs import GenerationSpec
from sd_endpoint.service import CPU_WARMUP_SIZE, GenerationService


def warmed_shapes(service: GenerationService, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    original = service.backend.generate

    def spy(spec: GenerationSpec, tasks: Sequence[Any], cancel: Any = None, on_step: Any = None) -> Any:
        shapes.append((spec.height, spec.width))
        return original(spec, tasks, cancel, on_step)

    monkeypatch.setattr(service.backend, "generate", spy)
    service.warmup()
    return shapes


def test_cpu_warms_up_small(service: GenerationService, monkeypatch: pytest.MonkeyPatch) -> None:
    assert service.backend.native_size == (768, 768)  # the demo model is SD 2.1-sized
    assert warmed_shapes(service, monkeypatch) == [(CPU_WARMUP_SIZE, CPU_WARMUP_SIZE)]
    assert service.ready


def test_gpu_warms_up_at_the_native_size(service: GenerationService, monkeypatch: pytest.MonkeyPatch) -> None:
    describe = service.backend.describe()
    monkeypatch.setattr(service.backend, "describe", lambda: {**describe, "device": "cuda:0"})
    assert warmed_shapes(service, monkeypatch) == [(768, 768)]
