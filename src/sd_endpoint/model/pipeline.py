"""The one place a diffusers pipeline is assembled from SD modules: without a safety checker or feature
extractor (SD 2.1 ships none; content screening is ``safety/``'s job) and without progress bars.

A pipeline object only references its modules, so building one per task shares every weight.
"""

from __future__ import annotations

from typing import Any

from sd_endpoint.jobs import TaskName

_PIPELINES: dict[TaskName, str] = {
    "text-to-image": "StableDiffusionPipeline",
    "image-to-image": "StableDiffusionImg2ImgPipeline",
    "inpainting": "StableDiffusionInpaintPipeline",
}


def pipeline_class(task: TaskName) -> Any:
    import diffusers

    return getattr(diffusers, _PIPELINES[task])


def build_pipeline(task: TaskName, *, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any) -> Any:
    """The task's diffusers pipeline over the given (shared) modules."""
    pipe = pipeline_class(task)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
