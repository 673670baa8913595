"""The diffusers path's speed-ups: none on CPU fp32 (the reference), channels-last in bf16, and
torch.compile confined to the warm shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.jobs import GenerationSpec, ImageTask
from sd_endpoint.model.discovery import ModelSource
from sd_endpoint.model.loading import load_pipeline
from sd_endpoint.model.placement import Placement

SPEC = GenerationSpec(64, 64, 3, 7.5, "ddim", 0.0)


def load(tiny_model_dir: Path, cache_dir: Path, dtype: str) -> Any:
    source = ModelSource("diffusers", str(tiny_model_dir), "test")
    return load_pipeline(source, Placement("cpu", dtype, "test"), cache_dir)


def test_cpu_fp32_is_plain_diffusers_pixel_for_pixel(backend: DiffusersBackend, tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    assert backend.optimisations == [] and backend.runner is None
    assert type(backend.pipe.unet).__name__ == "UNet2DConditionModel"
    assert backend.pipe.unet.conv_in.weight.is_contiguous()  # not channels-last
    ours = backend.generate(SPEC, [ImageTask("a lighthouse at dusk", "fog", 7)]).images[0]
    plain = StableDiffusionPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    plain.set_progress_bar_config(disable=True)
    ref = plain(
        "a lighthouse at dusk",
        negative_prompt="fog",
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


def test_eager_latents_equal_the_served_latents_without_a_runner(backend: DiffusersBackend) -> None:
    task = [ImageTask("a red fox", None, 3)]
    with torch.inference_mode():
        served = backend.latents(SPEC, task)[1]
        eager = backend.latents(SPEC, task, eager=True)[1]
    assert torch.equal(served, eager)


def test_cpu_bf16_runs_channels_last(tiny_model_dir: Path, cache_dir: Path) -> None:
    bf16 = DiffusersBackend(load(tiny_model_dir, cache_dir, "bfloat16"))
    assert bf16.dtype == torch.bfloat16 and bf16.optimisations == ["channels-last"]
    assert bf16.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert bf16.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    first = bf16.generate(SPEC, [ImageTask("a red fox", None, 3)])
    again = bf16.generate(SPEC, [ImageTask("a red fox", None, 3)])
    assert first.notes == [[]]  # the fp16 NaN guard does not concern bf16
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert bf16.describe()["optimisations"] == "channels-last"


def test_compile_is_confined_to_warm_shapes(tiny_model_dir: Path, cache_dir: Path) -> None:
    pipe = load(tiny_model_dir, cache_dir, "float32")
    compiled = DiffusersBackend(pipe, compile=True)
    assert compiled.runner is not None and compiled.runner._fast is not None
    assert "torch.compile" in compiled.optimisations
    assert compiled.describe()["warm_shapes"] == "none"
    # Nothing was warmed, so every shape runs the eager UNet: no compilation at request time.
    plain = DiffusersBackend(load(tiny_model_dir, cache_dir, "float32"))
    task = [ImageTask("a red fox", None, 3)]
    a = compiled.generate(SPEC, task).images[0]
    b = plain.generate(SPEC, task).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not compiled.runner.warm_keys


def test_optimise_off_leaves_bf16_untouched(tiny_model_dir: Path, cache_dir: Path) -> None:
    bf16 = DiffusersBackend(load(tiny_model_dir, cache_dir, "bfloat16"), optimise=False)
    assert bf16.optimisations == [] and bf16.pipe.unet.conv_in.weight.is_contiguous()


def test_a_failed_warm_up_serves_the_eager_unet(
    tiny_model_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = DiffusersBackend(load(tiny_model_dir, cache_dir, "float32"), compile=True)
    assert compiled.runner is not None

    def broken(keys: Any, *, graphs: bool) -> float:
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(compiled.runner, "warm", broken)
    assert compiled.warm([(64, 64, 1)]) == 0.0
    assert compiled.runner is None and compiled.pipe.unet is compiled.raw_unet
    assert compiled.describe()["optimisations"] == "torch.compile off (warm-up failed: RuntimeError)"
    assert compiled.describe()["warm_shapes"] == "none"
    assert len(compiled.generate(SPEC, [ImageTask("a red fox", None, 3)]).images) == 1


def test_channels_last_only_on_cpu_below_fp32() -> None:
    from sd_endpoint.backends.diffusers_backend import wants_channels_last

    assert not wants_channels_last("cpu", "float32")  # the reference path
    assert wants_channels_last("cpu", "bfloat16")  # oneDNN's bf16 convolutions: 10-20% faster in NHWC
    # CUDA GroupNorm forces NCHW: channels-last cost 10% at batch 4 on an H200.
    assert not wants_channels_last("cuda", "float16") and not wants_channels_last("cuda", "float32")


def test_an_fp16_decode_with_nans_is_decoded_again_in_fp32(backend: DiffusersBackend) -> None:
    """SD 2.x's VAE can overflow in fp16 and return NaNs (a black image). Only the image with NaNs is decoded
    again, in fp32, and its record says so. Breaks if the guard in decode() is turned off."""
    vae = backend.pipe.vae
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    class Fp16VaeWithNaNs:
        """The real VAE's output in fp16, with image 1 overflowed as it happens on a GPU."""

        config = vae.config

        def decode(self, scaled: torch.Tensor, return_dict: bool, generator: Any = None) -> tuple[torch.Tensor]:
            out = vae.decode(scaled, return_dict=False)[0].to(torch.float16)
            out[1, :, :4] = float("nan")
            return (out,)

    class Pipe:
        image_processor = backend.pipe.image_processor

    Pipe.vae = Fp16VaeWithNaNs()  # type: ignore[attr-defined]
    before = backend.nan_redecodes
    with torch.inference_mode():
        images, notes = backend.decode(Pipe(), latents, [torch.Generator(), torch.Generator()])
    assert notes == [[], ["decoded again in fp32 after NaNs in the fp16 VAE decode"]]
    assert backend.nan_redecodes == before + 1
    expected = backend.pipe.image_processor.postprocess(reference, output_type="pil")
    for ours, ref in zip(images, expected, strict=True):  # image 0 through fp16, image 1 decoded in fp32 again
        diff = np.abs(np.asarray(ours, np.int16) - np.asarray(ref, np.int16))
        assert diff.max() <= 2, diff.max()
