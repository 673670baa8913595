"""UNetRunner on the CPU: warm shapes take the fast callable, others the eager UNet; graphs need CUDA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.backends.unet_runner import UNetRunner, unet_inputs_for


class Recorder:
    """A 'compiled' UNet that records the batch sizes it ran, then runs the real one."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.batches: list[int] = []
        self.timestep_dtypes: set[Any] = set()

    def __call__(self, sample: Any, timestep: Any, context: Any, return_dict: bool = False) -> Any:
        self.batches.append(int(sample.shape[0]))
        self.timestep_dtypes.add(timestep.dtype)
        return self.unet(sample, timestep, context, return_dict=False)


def inputs(unet: Any, height: int, width: int, batch: int) -> tuple[Any, Any, Any]:
    sample_shape, context_shape = unet_inputs_for(unet, height, width, batch)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(sample_shape, generator=gen), torch.tensor(400), torch.randn(context_shape, generator=gen)


def test_warm_shapes_use_the_fast_callable_others_the_eager_unet(backend: DiffusersBackend) -> None:
    unet = backend.pipe.unet
    fast = Recorder(unet)
    runner = UNetRunner(unet, fast=fast)
    runner.warm([unet_inputs_for(unet, 64, 64, 1), unet_inputs_for(unet, 64, 64, 2)], graphs=False)
    assert fast.batches == [4, 2]  # largest batch first (DeepSpeed sizes its workspace on first use)
    fast.batches.clear()
    with torch.inference_mode():
        warm = inputs(unet, 64, 64, 1)
        got = runner(*warm, return_dict=False)[0]
        assert fast.batches == [2]
        assert torch.equal(got, unet(*warm, return_dict=False)[0])
        other = inputs(unet, 72, 64, 1)
        out = runner(*other)  # return_dict=True, as diffusers' default
        assert fast.batches == [2]
        assert torch.equal(out.sample, unet(*other).sample)
        # Extra conditioning (not what SD 2.1's pipeline sends) always takes the eager module.
        runner(*warm, cross_attention_kwargs={"scale": 1.0})
        assert fast.batches == [2]
    assert runner.handles(unet_inputs_for(unet, 64, 64, 2)) and not runner.handles(unet_inputs_for(unet, 72, 64, 1))
    # The scheduler's int64 timestep reaches the compiled callable as the float32 it was warmed with:
    # another dtype would make dynamo compile again, at request time.
    assert inputs(unet, 64, 64, 1)[1].dtype == torch.int64 and fast.timestep_dtypes == {torch.float32}


def test_strict_runner_refuses_uncaptured_shapes(backend: DiffusersBackend) -> None:
    unet = backend.pipe.unet
    runner = UNetRunner(unet, fast=Recorder(unet), strict=True, label="deepspeed UNet")
    runner.warm([unet_inputs_for(unet, 64, 64, 1)], graphs=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="was not captured at start-up"):
        runner(*inputs(unet, 72, 64, 1))


def test_graphs_need_cuda(backend: DiffusersBackend) -> None:
    unet = backend.pipe.unet
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        UNetRunner(unet).warm([unet_inputs_for(unet, 64, 64, 1)], graphs=True)


def test_runner_looks_like_the_unet_to_the_pipeline(backend: DiffusersBackend) -> None:
    unet = backend.pipe.unet
    runner = UNetRunner(unet)
    assert runner.config is unet.config and runner.dtype == unet.dtype and runner.device == unet.device
    assert runner.in_channels == 4


def test_time_call_runs_the_warm_path_and_release_forgets_it(backend: DiffusersBackend) -> None:
    unet = backend.pipe.unet
    fast = Recorder(unet)
    runner = UNetRunner(unet, fast=fast)
    key = unet_inputs_for(unet, 64, 64, 1)
    runner.warm([key], graphs=False)
    fast.batches.clear()
    assert runner.time_call(key, repeats=3) > 0
    assert fast.batches == [2] * 4  # one untimed call, then the timed ones, all on the warm path
    runner.release()
    assert not runner.handles(key) and not runner.warm_keys
