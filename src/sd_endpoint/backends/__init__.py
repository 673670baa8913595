"""Backends: the engines behind the service. ``create_backend`` loads the model and picks one."""

from __future__ import annotations

import logging

from sd_endpoint.backends.base import Backend, BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Backend", "BatchResult", "CancelToken", "GenerationSpec", "ImageTask", "create_backend"]


def create_backend(settings: Settings) -> Backend:
    """Resolve and load the model, then wrap it in the configured backend."""
    from sd_endpoint.backends.diffusers_backend import DiffusersBackend
    from sd_endpoint.model.loader import choose_placement, load_pipeline, resolve_source

    source = resolve_source(settings)
    if source.kind == "demo":
        log.warning(
            "Serving the built-in DEMO model (%s): random weights, every image is NOISE. "
            "Set SD_ENDPOINT_MODEL or AZUREML_MODEL_DIR to serve a real SD 2.1 model.",
            source.reason,
        )
    else:
        log.info("Model: %s (%s)", source.location, source.reason)
    placement = choose_placement(settings)
    log.info("Device %s, dtype %s: %s", placement.device, placement.dtype_name, placement.reason)
    pipe = load_pipeline(source, placement, settings.cache_dir)
    return DiffusersBackend(pipe, placement_reason=placement.reason, source=f"{source.kind}:{source.location}")
