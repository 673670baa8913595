"""Backends: the engines behind the service. ``create_backend`` loads the model and picks one."""

from __future__ import annotations

import logging
from pathlib import Path

from sd_endpoint.backends.base import Backend
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Backend", "BatchResult", "CancelToken", "GenerationSpec", "ImageTask", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    """Resolve and load the model, then wrap it in the backend the settings ask for (see selection.py)."""
    from sd_endpoint.model.discovery import resolve_source

    source = resolve_source(settings)
    if source.kind == "demo":
        log.warning(
            "Serving the built-in DEMO model (%s): random weights, every image is NOISE. "
            "Set SD_ENDPOINT_MODEL or AZUREML_MODEL_DIR to serve a real SD 2.1 model.",
            source.reason,
        )
    else:
        log.info("Model: %s (%s)", source.location, source.reason)
    from sd_endpoint.backends.selection import build_backend
    from sd_endpoint.model.loading import load_pipeline
    from sd_endpoint.model.placement import choose_placement

    placement = choose_placement(settings)  # imports torch
    log.info("Device %s, dtype %s: %s", placement.device, placement.dtype_name, placement.reason)
    early = None
    if source.kind == "diffusers":
        # Start reading into the final tensors now, while diffusers and transformers import; the read is
        # handed to the loader, which finishes it.
        from sd_endpoint.backends.diffusers_backend import wants_channels_last
        from sd_endpoint.model.fast_load import start_load
        from sd_endpoint.model.weights import choose_variant

        folder = Path(source.location)
        device_type = placement.device.split(":")[0]
        nhwc = wants_channels_last(device_type, placement.dtype_name)
        variant = choose_variant(folder, placement.dtype_name)
        early = start_load(folder, placement.device, placement.dtype_name, variant, channels_last=nhwc)
    pipe = load_pipeline(source, placement, settings.cache_dir, early=early)
    return build_backend(settings, pipe, placement_reason=placement.reason, source=source.label)
