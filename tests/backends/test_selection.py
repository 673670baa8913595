"""Backend choice: auto/diffusers/deepspeed, the start-up self-check, and the fallbacks with their reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sd_endpoint.backends import selection
from sd_endpoint.backends.checks import self_check
from sd_endpoint.backends.deepspeed_backend import DeepSpeedUnavailable
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.backends.routing import RoutingBackend
from sd_endpoint.backends.selection import build_backend, deepspeed_blocker
from sd_endpoint.errors import ModelLoadError
from sd_endpoint.settings import Settings, load_settings
from tests.support.fakes import FakeDeepSpeed

SHAPES = "64x64x1,64x64x2"


def make_settings(tiny_model_dir: Path, cache_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": str(tiny_model_dir),
        "device": "cpu",
        "dtype": "float32",
        "cache_dir": cache_dir,
        "warm_shapes": SHAPES,
        **overrides,
    }
    return load_settings(**values)


@pytest.fixture(scope="module")
def pipe(backend: DiffusersBackend) -> Any:
    return backend.pipe  # the session's fp32 CPU pipeline; CPU fp32 backends leave it untouched


@pytest.fixture
def cuda_like(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the CUDA/fp16/DeepSpeed preconditions hold, so the logic after them runs on CPU."""
    monkeypatch.setattr(selection, "deepspeed_blocker", lambda device, dtype, shapes, need_prebuilt=False: None)


def test_auto_considers_deepspeed_only_with_prebuilt_ops(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.metadata

    shapes = [(768, 768, 1)]
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.8.0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty JIT cache
    assert selection.missing_deepspeed_ops() == ["transformer_inference", "spatial_inference"]
    blocked = str(deepspeed_blocker("cuda:0", "float16", shapes, need_prebuilt=True))
    assert "not pre-built" in blocked and "DS_BUILD_TRANSFORMER_INFERENCE=1" in blocked
    assert deepspeed_blocker("cuda:0", "float16", shapes) is None  # explicit deepspeed may build them
    for name in ("transformer_inference", "spatial_inference"):  # as the JIT build leaves them
        (tmp_path / "py311_cu128" / name).mkdir(parents=True)
        (tmp_path / "py311_cu128" / name / f"{name}.so").write_bytes(b"")
    assert selection.missing_deepspeed_ops() == []
    assert deepspeed_blocker("cuda:0", "float16", shapes, need_prebuilt=True) is None
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.9.0")
    assert "removed tl.make_block_ptr" in str(deepspeed_blocker("cuda:0", "float16", shapes))


def test_blocker_names_the_first_missing_precondition(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    shapes = [(768, 768, 1)]
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.8.0")
    monkeypatch.setattr(selection, "deepspeed_installed", lambda: True)
    assert "no CUDA device" in str(deepspeed_blocker("cpu", "float16", shapes))
    assert "fp16-only" in str(deepspeed_blocker("cuda", "bfloat16", shapes))
    assert "SD_ENDPOINT_WARM_SHAPES is empty" in str(deepspeed_blocker("cuda:0", "float16", []))
    assert deepspeed_blocker("cuda:0", "float16", shapes) is None
    monkeypatch.setattr(selection, "deepspeed_installed", lambda: False)
    assert "not installed" in str(deepspeed_blocker("cuda", "float16", shapes))


def test_auto_on_cpu_serves_diffusers_and_says_why(tiny_model_dir: Path, cache_dir: Path, pipe: Any) -> None:
    settings = make_settings(tiny_model_dir, cache_dir, backend="auto")
    called: list[object] = []
    chosen = build_backend(settings, pipe, deepspeed_factory=lambda base, shapes: called.append(1))  # type: ignore[arg-type,return-value]
    assert isinstance(chosen, DiffusersBackend)
    assert called == []  # the DeepSpeed path is not even tried without CUDA
    reason = chosen.describe()["backend_reason"]
    assert reason.startswith("auto:") and "no CUDA device" in reason


def test_auto_without_deepspeed_installed_says_so(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = selection.deepspeed_blocker
    monkeypatch.setattr(selection, "deepspeed_installed", lambda: False)
    # The model is on the CPU here; ask the blocker as if it were on CUDA in fp16.
    monkeypatch.setattr(
        selection,
        "deepspeed_blocker",
        lambda device, dtype, shapes, need_prebuilt=False: real("cuda", "float16", shapes),
    )
    chosen = build_backend(make_settings(tiny_model_dir, cache_dir), pipe)
    assert isinstance(chosen, DiffusersBackend)
    assert "DeepSpeed is not installed" in chosen.describe()["backend_reason"]


def test_explicit_diffusers_is_never_checked(tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None) -> None:
    chosen = build_backend(
        make_settings(tiny_model_dir, cache_dir, backend="diffusers"),
        pipe,
        deepspeed_factory=lambda base, shapes: pytest.fail("must not build DeepSpeed"),  # type: ignore[arg-type,return-value]
    )
    assert isinstance(chosen, DiffusersBackend)
    assert chosen.describe()["backend_reason"] == "SD_ENDPOINT_BACKEND=diffusers"


def test_explicit_deepspeed_without_cuda_is_a_clear_start_up_error(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any
) -> None:
    with pytest.raises(ModelLoadError, match=r"SD_ENDPOINT_BACKEND=deepspeed: no CUDA device"):
        build_backend(make_settings(tiny_model_dir, cache_dir, backend="deepspeed"), pipe)


def test_auto_serves_deepspeed_when_the_self_check_passes(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None
) -> None:
    built: list[FakeDeepSpeed] = []

    def factory(base: DiffusersBackend, shapes: Any) -> FakeDeepSpeed:
        built.append(FakeDeepSpeed(base, shapes))
        return built[-1]

    faster = {"deepspeed": 0.008, "diffusers": 0.010}
    chosen = build_backend(
        make_settings(tiny_model_dir, cache_dir),
        pipe,
        deepspeed_factory=factory,
        timer=lambda b, shape: faster["deepspeed" if isinstance(b, FakeDeepSpeed) else "diffusers"],
    )
    assert isinstance(chosen, RoutingBackend)
    assert chosen.fast is built[0] and not built[0].released
    assert built[0].warm_shapes == [(64, 64, 1), (64, 64, 2)]
    info = chosen.describe()
    assert info["backend"] == "deepspeed"
    assert "per-layer check passed" in info["backend_reason"] and "64x64x1" in info["backend_reason"]
    assert info["captured_shapes"] == "64x64x1,64x64x2"
    assert info["device"] == "cpu"  # the rest comes from the diffusers path it shares modules with


@pytest.mark.parametrize(("scale", "nan"), [(1.3, False), (1.0, True)])
def test_auto_falls_back_when_the_engine_disagrees(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None, scale: float, nan: bool
) -> None:
    built: list[FakeDeepSpeed] = []

    def factory(base: DiffusersBackend, shapes: Any) -> FakeDeepSpeed:
        built.append(FakeDeepSpeed(base, shapes, scale=scale, nan=nan))
        return built[-1]

    chosen = build_backend(make_settings(tiny_model_dir, cache_dir), pipe, deepspeed_factory=factory)
    assert isinstance(chosen, DiffusersBackend)
    assert built[0].released  # its graphs and workspace are freed when it is dropped
    reason = chosen.describe()["backend_reason"]
    assert "DeepSpeed self-check failed" in reason
    assert ("inf" if nan else "3.00e-01") in reason  # the measured relative error is reported


def test_explicit_deepspeed_refuses_to_start_when_the_engine_disagrees(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None
) -> None:
    with pytest.raises(ModelLoadError, match="self-check failed"):
        build_backend(
            make_settings(tiny_model_dir, cache_dir, backend="deepspeed"),
            pipe,
            deepspeed_factory=lambda base, shapes: FakeDeepSpeed(base, shapes, scale=2.0),  # type: ignore[arg-type,return-value]
        )


def test_failed_engine_start_falls_back_in_auto_and_fails_when_explicit(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None
) -> None:
    def broken(base: DiffusersBackend, shapes: Any) -> FakeDeepSpeed:
        raise DeepSpeedUnavailable("cannot import DeepSpeed's inference kernels: ImportError: triton")

    chosen = build_backend(make_settings(tiny_model_dir, cache_dir), pipe, deepspeed_factory=broken)
    assert isinstance(chosen, DiffusersBackend)
    assert "failed to start: DeepSpeedUnavailable: cannot import" in chosen.describe()["backend_reason"]
    with pytest.raises(ModelLoadError, match="SD_ENDPOINT_BACKEND=deepspeed: DeepSpeed path failed to start"):
        build_backend(make_settings(tiny_model_dir, cache_dir, backend="deepspeed"), pipe, deepspeed_factory=broken)


def test_self_check_measures_the_relative_latent_error(backend: DiffusersBackend) -> None:
    same = self_check(FakeDeepSpeed(backend, [(64, 64, 2)]), backend, (64, 64, 2))
    assert same.passed and same.relative_error == 0.0 and same.shape == (64, 64, 2)
    near = self_check(FakeDeepSpeed(backend, [(64, 64, 1)], scale=1.01), backend, (64, 64, 1))
    assert near.passed and near.relative_error == pytest.approx(0.01, rel=1e-3)
    far = self_check(FakeDeepSpeed(backend, [(64, 64, 1)], scale=1.06), backend, (64, 64, 1))
    assert not far.passed and far.relative_error == pytest.approx(0.06, rel=1e-3)
    assert "tolerance 5e-02" in far.describe()


def test_backend_choice_reaches_the_metrics(tiny_model_dir: Path, cache_dir: Path) -> None:
    from sd_endpoint import metrics
    from sd_endpoint.safety.base import NullScreener
    from sd_endpoint.service import GenerationService

    service = GenerationService.from_settings(make_settings(tiny_model_dir, cache_dir), screener=NullScreener())
    try:
        samples = [s for m in metrics.REGISTRY.collect() if m.name == "sd_backend" for s in m.samples]
        assert len(samples) == 1
        labels = samples[0].labels
        assert labels["backend"] == "diffusers"
        assert "no CUDA device" in labels["backend_reason"]
    finally:
        service.close()


def test_auto_takes_deepspeed_only_when_it_is_faster(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None
) -> None:
    def timer(speeds: dict[str, float]) -> Any:
        return lambda backend, shape: speeds["deepspeed" if isinstance(backend, FakeDeepSpeed) else "diffusers"]

    settings = make_settings(tiny_model_dir, cache_dir)
    slower = build_backend(
        settings,
        pipe,
        deepspeed_factory=FakeDeepSpeed,  # type: ignore[arg-type]
        timer=timer({"deepspeed": 0.0125, "diffusers": 0.0100}),
    )
    assert isinstance(slower, DiffusersBackend)
    reason = slower.describe()["backend_reason"]
    assert "passed its checks but is not faster" in reason
    assert "UNet step at 64x64x1: DeepSpeed 12.5 ms, diffusers 10.0 ms" in reason
    # Within the 3% margin counts as not faster: the simpler path serves.
    tie = build_backend(
        settings,
        pipe,
        deepspeed_factory=FakeDeepSpeed,
        timer=timer({"deepspeed": 0.0099, "diffusers": 0.0100}),  # type: ignore[arg-type]
    )
    assert isinstance(tie, DiffusersBackend)
    faster = build_backend(
        settings,
        pipe,
        deepspeed_factory=FakeDeepSpeed,
        timer=timer({"deepspeed": 0.008, "diffusers": 0.010}),  # type: ignore[arg-type]
    )
    assert isinstance(faster, RoutingBackend)
    assert "DeepSpeed 8.0 ms, diffusers 10.0 ms" in faster.describe()["backend_reason"]
    assert faster.fallback.warm_shapes == []  # the diffusers path's warm-up was released


def test_the_race_winner_frees_the_diffusers_paths_warm_shapes(
    tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks if build_backend stops calling base.release_warm() once DeepSpeed wins: on a GPU the diffusers
    path would keep its compiled graphs and CUDA-graph pools for shapes it no longer serves."""
    released: list[DiffusersBackend] = []
    monkeypatch.setattr(DiffusersBackend, "release_warm", lambda self: released.append(self))
    settings = make_settings(tiny_model_dir, cache_dir)

    def timer(ds: float) -> Any:
        return lambda backend, shape: ds if isinstance(backend, FakeDeepSpeed) else 0.010

    slower = build_backend(settings, pipe, deepspeed_factory=FakeDeepSpeed, timer=timer(0.0125))  # type: ignore[arg-type]
    assert isinstance(slower, DiffusersBackend) and released == []  # the diffusers path serves: keep its warm-up
    faster = build_backend(settings, pipe, deepspeed_factory=FakeDeepSpeed, timer=timer(0.008))  # type: ignore[arg-type]
    assert isinstance(faster, RoutingBackend) and released == [faster.fallback]


def test_release_warm_drops_the_runners_graphs_and_says_so(backend: DiffusersBackend) -> None:
    class Runner:
        released = 0

        def release(self) -> None:
            self.released += 1

    runner = Runner()
    saved = (backend.runner, backend.warm_shapes, list(backend.optimisations))
    try:
        backend.runner, backend.warm_shapes = runner, [(64, 64, 1)]  # type: ignore[assignment]
        backend.optimisations = [*saved[2], "CUDA graphs"]
        backend.release_warm()
        assert runner.released == 1 and backend.warm_shapes == []
        assert "CUDA graphs" not in backend.optimisations
    finally:
        backend.runner, backend.warm_shapes, backend.optimisations = saved


def test_explicit_deepspeed_is_not_raced(tiny_model_dir: Path, cache_dir: Path, pipe: Any, cuda_like: None) -> None:
    chosen = build_backend(
        make_settings(tiny_model_dir, cache_dir, backend="deepspeed"),
        pipe,
        deepspeed_factory=FakeDeepSpeed,  # type: ignore[arg-type]
        timer=lambda backend, shape: pytest.fail("explicit deepspeed must not be timed"),
    )
    assert isinstance(chosen, RoutingBackend)
