"""Image-to-image and inpainting on the loaded text-to-image modules: no second copy of any weight.

diffusers' ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` take the same
modules as ``StableDiffusionPipeline`` (VAE, text encoder, tokenizer, UNet, scheduler); a pipeline object
is only references to them, so building one per call (``model.pipeline.build_pipeline``) shares every
tensor. SD 2.1's UNet has 4 input channels (not the 9 of a dedicated inpainting UNet): diffusers'
inpainting pipeline then denoises the whole latent and, after every step, puts the known region back (the
input image's latents noised to the next timestep), so only the white part of the mask is repainted.

Each image keeps its own CPU generator, used in the same order as for that image alone (VAE-encode
sample, initial noise, then the masked image's encode for inpainting), so an image is the same whether it
is generated alone or merged with others of the same task and shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sd_endpoint.jobs import GenerationSpec, ImageTask


def call_arguments(spec: GenerationSpec, tasks: Sequence[ImageTask]) -> dict[str, Any]:
    """The task-specific keyword arguments of the pipeline's ``__call__`` for this batch."""
    if spec.task == "text-to-image":
        return {"height": spec.height, "width": spec.width}
    images = []
    for n, task in enumerate(tasks):
        if task.image is None or task.image.size != (spec.width, spec.height):
            raise ValueError(f"task {n} of a {spec.task} batch needs an input image of {spec.width}x{spec.height}")
        images.append(task.image)
    args: dict[str, Any] = {"image": images, "strength": spec.strength}
    if spec.task == "inpainting":
        masks = []
        for n, task in enumerate(tasks):
            if task.mask is None or task.mask.size != (spec.width, spec.height):
                raise ValueError(f"task {n} of an inpainting batch needs a mask of {spec.width}x{spec.height}")
            masks.append(task.mask)
        args.update(mask_image=masks, height=spec.height, width=spec.width)
    return args
