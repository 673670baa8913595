"""Image-to-image and inpainting on the loaded model: equal to diffusers' own pipelines, sharing every
weight with text-to-image, batch-independent, cancellable, and never sent to the DeepSpeed path."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sd_endpoint.backends.deepspeed_backend import captured_batch_sizes
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.backends.selection import RoutingBackend
from sd_endpoint.errors import GenerationCancelled
from sd_endpoint.jobs import CancelToken, GenerationSpec, ImageTask
from sd_endpoint.service import GenerationService
from tests.support.fakes import FakeDeepSpeed


def picture(width: int = 100, height: int = 72, seed: int = 0) -> Image.Image:
    """A smooth picture (gradients and a disc), closer to a photo than noise."""
    y, x = np.mgrid[0:height, 0:width].astype(float)
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < (0.25 * height) ** 2) * 120.0
    rgb = np.stack([x / width * 255, y / height * 255, 255 - disc], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def mask_for(width: int = 100, height: int = 72) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decoded(record: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(record["generated_image"]))).convert("RGB"), dtype=int)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, Any]:
    """diffusers' own pipelines, built from the components of a plain text-to-image pipeline loaded apart."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    plain = StableDiffusionPipeline.from_pretrained(
        str(tiny_model_dir), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    pipes = {
        "image-to-image": StableDiffusionImg2ImgPipeline(**plain.components),
        "inpainting": StableDiffusionInpaintPipeline(**plain.components),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def within_one_level(ours: np.ndarray, ref: np.ndarray) -> bool:
    return ours.shape == ref.shape and int(np.abs(ours - ref).max()) <= 1


# --- fidelity: the whole path (contract, service, backend) against diffusers ---------------------


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_image_to_image_equals_diffusers(
    service: GenerationService, reference: dict[str, Any], strength: float
) -> None:
    source = picture()  # 100x72: neither side needs a size; both round it down to 96x72
    body = {
        "input_data": {
            "columns": ["prompt", "negative_prompt", "image"],
            "data": [["a lighthouse at dusk", "fog", b64(source)]],
        },
        "parameters": {"num_inference_steps": 4, "strength": strength, "seed": 11},
    }
    ours = decoded(service.handle(body).records[0])
    ref = reference["image-to-image"](
        "a lighthouse at dusk",
        image=source,
        negative_prompt="fog",
        strength=strength,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(11),
    ).images[0]
    ref_px = np.asarray(ref, dtype=int)
    assert ours.shape == (72, 96, 3)
    assert within_one_level(ours, ref_px)
    # The comparison has teeth: another seed is far off.
    other = reference["image-to-image"](
        "a lighthouse at dusk", image=source, negative_prompt="fog", strength=strength, num_inference_steps=4,
        generator=torch.Generator().manual_seed(12),
    ).images[0]  # fmt: skip
    assert np.abs(np.asarray(other, dtype=int) - ref_px).mean() > 5


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_equals_diffusers(service: GenerationService, reference: dict[str, Any], strength: float) -> None:
    source, mask = picture(seed=1), mask_for()
    body = {
        "input_data": {
            "columns": ["prompt", "image", "mask_image"],
            "data": [{"prompt": "a red boat", "image": b64(source), "mask_image": b64(mask)}],
            "index": ["boat"],
        },
        "parameters": {"num_inference_steps": 4, "strength": strength, "seed": 5},
    }
    record = service.handle(body).records[0]
    assert record["index"] == "boat" and record["seed"] == 5
    ours = decoded(record)
    ref = reference["inpainting"](
        "a red boat",
        image=source,
        mask_image=mask,
        height=72,  # diffusers' inpainting defaults to the model's size; ours to the input's
        width=96,
        strength=strength,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    assert ours.shape == (72, 96, 3)
    assert within_one_level(ours, np.asarray(ref, dtype=int))


def test_explicit_size_equals_diffusers_given_the_resized_input(
    service: GenerationService, reference: dict[str, Any]
) -> None:
    source = picture()
    body = {
        "input_data": {"columns": ["prompt", "image"], "data": [["a fox", b64(source)]]},
        "parameters": {"num_inference_steps": 3, "seed": 2, "height": 64, "width": 64},
    }
    ours = decoded(service.handle(body).records[0])
    resized = source.resize((64, 64), resample=Image.Resampling.LANCZOS)
    ref = reference["image-to-image"](
        "a fox", image=resized, num_inference_steps=3, strength=0.8, generator=torch.Generator().manual_seed(2)
    ).images[0]
    assert within_one_level(ours, np.asarray(ref, dtype=int))


# --- one copy of the weights ------------------------------------------------------------------


@pytest.mark.parametrize("task", ["image-to-image", "inpainting"])
def test_image_pipelines_share_every_weight_with_text_to_image(backend: DiffusersBackend, task: str) -> None:
    pipe = backend.pipeline_for(GenerationSpec(64, 64, 2, 7.5, "ddim", 0.0, task, 0.5))  # type: ignore[arg-type]
    assert type(pipe).__name__ == {"image-to-image": "StableDiffusionImg2ImgPipeline"}.get(
        task, "StableDiffusionInpaintPipeline"
    )
    text = backend.pipe
    for name in ("unet", "vae", "text_encoder"):
        ours = [p.data_ptr() for p in getattr(pipe, name).parameters()]
        theirs = [p.data_ptr() for p in getattr(text, name).parameters()]
        assert ours == theirs and len(ours) > 0, name
    assert pipe.tokenizer is text.tokenizer


# --- batching, cancellation, routing ---------------------------------------------------------------


def img2img_tasks(spec: GenerationSpec, seeds: list[int], *, masked: bool = False) -> list[ImageTask]:
    out = []
    for n, seed in enumerate(seeds):
        image = picture(spec.width, spec.height, seed=n)
        out.append(ImageTask(f"prompt {n}", None, seed, image, mask_for(spec.width, spec.height) if masked else None))
    return out


@pytest.mark.parametrize("task", ["image-to-image", "inpainting"])
def test_a_merged_batch_equals_each_image_alone(backend: DiffusersBackend, task: str) -> None:
    spec = GenerationSpec(64, 64, 3, 7.5, "ddim", 0.0, task, 0.7)  # type: ignore[arg-type]
    tasks = img2img_tasks(spec, [3, 4], masked=task == "inpainting")
    merged = backend.generate(spec, tasks).images
    for task_, image in zip(tasks, merged, strict=True):
        alone = backend.generate(spec, [task_]).images[0]
        assert within_one_level(np.asarray(image, dtype=int), np.asarray(alone, dtype=int))
    assert not np.array_equal(np.asarray(merged[0]), np.asarray(merged[1]))


def test_image_to_image_stops_between_steps_and_reports_its_own_step_count(backend: DiffusersBackend) -> None:
    spec = GenerationSpec(64, 64, 10, 7.5, "ddim", 0.0, "image-to-image", 0.5)
    assert spec.denoising_steps == 5
    seen: list[tuple[int, int]] = []
    result = backend.generate(spec, img2img_tasks(spec, [1]), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)] and result.steps_done == 5

    token = CancelToken()

    def cancel_at_two(i: int, _n: int) -> None:
        if i == 2:
            token.cancel("client disconnected")

    with pytest.raises(GenerationCancelled):
        backend.generate(spec, img2img_tasks(spec, [1]), token, cancel_at_two)
    assert token.steps_done == 2


def test_image_tasks_never_take_the_deepspeed_path(backend: DiffusersBackend) -> None:
    shapes = [(64, 64, 1), (64, 64, 2)]
    assert captured_batch_sizes(shapes, GenerationSpec(64, 64, 2, 7.5, "ddim")) == [2, 1]
    for task in ("image-to-image", "inpainting"):
        assert captured_batch_sizes(shapes, GenerationSpec(64, 64, 2, 7.5, "ddim", 0.0, task, 0.5)) == []  # type: ignore[arg-type]
    router = RoutingBackend(FakeDeepSpeed(backend, shapes), backend, "test")
    spec = GenerationSpec(64, 64, 2, 7.5, "ddim", 0.0, "image-to-image", 1.0)
    result = router.generate(spec, img2img_tasks(spec, [1, 2]))
    assert router.fast.batches == [] and router.routed == {"deepspeed": 0, "diffusers": 2}  # type: ignore[attr-defined]
    assert len(result.images) == 2
