"""Shared fixtures: a tiny SD-2.1-shaped model built once per session, and the service over it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _triton_interpreter_without_cuda() -> None:
    """Without CUDA, Triton kernels (DeepSpeed's attention, tests/backends/ds_triton.py) can only run in
    Triton's interpreter, and that is decided when triton is first imported (diffusers imports it)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_triton_interpreter_without_cuda()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the session (tokenizer files, demo model), like ~/.cache/sd-endpoint."""
    return tmp_path_factory.mktemp("sd-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_endpoint.model.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "tiny-sd21", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def settings(tiny_model_dir: Path, cache_dir: Path):  # type: ignore[no-untyped-def]
    from sd_endpoint.settings import load_settings

    # fp32 on CPU: the reference precision for pixel comparisons.
    return load_settings(model=str(tiny_model_dir), device="cpu", dtype="float32", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def backend(settings):  # type: ignore[no-untyped-def]
    from sd_endpoint.backends import create_backend

    return create_backend(settings)


@pytest.fixture
def service(settings, backend) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    from sd_endpoint.service import GenerationService

    svc = GenerationService(settings, backend)
    yield svc
    svc.close()


def small_request(prompts: list[str] | None = None, **params: object) -> dict[str, object]:
    """A request that runs in well under a second on the tiny model."""
    merged: dict[str, object] = {"num_inference_steps": 3, "height": 64, "width": 64, "seed": 1, **params}
    rows = prompts or ["a red fox in the snow"]
    return {
        "input_data": {"columns": ["prompt"], "data": rows, "index": list(range(len(rows)))},
        "parameters": merged,
    }
