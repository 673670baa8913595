"""Loading a StableDiffusionPipeline for a model source, straight to the chosen dtype, then to the device:
the fast loader for diffusers folders of safetensors, diffusers' own loaders for the rest."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model.checks import check_diffusers_folder, checkpoint_family, checkpoint_shapes
from sd_endpoint.model.discovery import ModelSource
from sd_endpoint.model.placement import Placement
from sd_endpoint.model.weights import choose_variant

if TYPE_CHECKING:
    from sd_endpoint.model.fast_load import PendingLoad

log = logging.getLogger(__name__)


def load_pipeline(
    source: ModelSource, placement: Placement, cache_dir: Path, *, early: PendingLoad | None = None
) -> Any:
    """Load a StableDiffusionPipeline for the source, straight to the chosen dtype, then to the device.

    ``early`` is the weight read ``fast_load.start_load`` began for this folder, if any (create_backend):
    the fast loader finishes it; whatever path is taken instead stops it."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_endpoint.model.demo import cached_demo_model

    dtype = getattr(torch, placement.dtype_name)
    started = time.perf_counter()
    common: dict[str, Any] = {
        "torch_dtype": dtype,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    location = source.location
    if source.kind == "demo":
        location = str(cached_demo_model(cache_dir))
    try:
        if source.kind in ("diffusers", "demo"):
            folder = Path(location)
            variant = choose_variant(folder, placement.dtype_name)
            check_diffusers_folder(folder, variant)
            pipe = _load_folder_fast(folder, placement, variant, early)
            early = None  # handed over: load_folder finished or discarded it
            if pipe is None:
                pipe = StableDiffusionPipeline.from_pretrained(
                    str(folder), local_files_only=True, variant=variant, **common
                )
        elif source.kind == "single_file":
            pipe = _load_single_file(Path(location), cache_dir, common)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(location, **common)
    except ModelLoadError:
        if early is not None:
            early.discard()  # an early read nobody will take: stop it (and restore torch's threads)
        raise
    except Exception as exc:  # library errors: name the path and keep the library's words
        if early is not None:
            early.discard()
        raise ModelLoadError(f"{location}: could not load the model: {type(exc).__name__}: {exc}") from exc
    if early is not None:  # started for a folder, but this source is not one
        early.discard()
    pipe.to(placement.device)  # a no-op for the fast loader, which loads to the device directly
    pipe.set_progress_bar_config(disable=True)
    log.info(
        "Loaded %s model from %s in %.1f s on %s as %s (%s)",
        source.kind,
        location,
        time.perf_counter() - started,
        placement.device,
        placement.dtype_name,
        placement.reason,
    )
    return pipe


def _load_folder_fast(folder: Path, placement: Placement, variant: str | None, early: PendingLoad | None) -> Any:
    """The fast loader (model/fast_load.py), or None when the folder needs from_pretrained's conversions."""
    from sd_endpoint.model.fast_load import FastLoadUnsupported, load_folder

    try:
        return load_folder(folder, placement.device, placement.dtype_name, variant, early=early)
    except FastLoadUnsupported as exc:
        log.info("Loading with from_pretrained instead of the fast loader: %s", exc)
        return None


def _load_single_file(file: Path, cache_dir: Path, common: dict[str, Any], config_dir: Path | None = None) -> Any:
    """Build the pipeline from an original-format SD 2.x checkpoint, offline, with SD 2.1's packaged configs.

    ``config_dir`` replaces those configs with another diffusers folder's (its weights are not read); tests
    use it to load tiny checkpoints.
    """
    from diffusers import StableDiffusionPipeline

    config = config_dir if config_dir is not None else single_file_config_dir(cache_dir)
    checkpoint_family(file, checkpoint_shapes(file), config)
    # config= alone, not original_config= (the yaml): from the yaml diffusers would derive the UNet config and
    # lose upcast_attention, which SD 2.1 needs in fp16; the diffusers configs carry it.
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(config), local_files_only=True, **common)
    except NotImplementedError as exc:
        if "meta tensor" not in str(exc):
            raise
        # diffusers leaves the UNet/VAE weights a checkpoint lacks on the meta device, then fails to move them.
        raise ModelLoadError(
            f"{file}: the checkpoint lacks UNet or VAE weights that SD 2.x has; expected a complete SD 2.x "
            "checkpoint such as v2-1_768-ema-pruned.safetensors."
        ) from exc
    _check_no_missing_weights(file, pipe)
    return pipe


def _check_no_missing_weights(file: Path, pipe: Any) -> None:
    """Weights absent from the checkpoint stay on the meta device (the text encoder's do); name them."""
    for component in ("unet", "vae", "text_encoder"):
        missing = [n for n, p in getattr(pipe, component).named_parameters() if p.device.type == "meta"]
        if missing:
            raise ModelLoadError(
                f"{file}: the checkpoint lacks {len(missing)} {component} weights (e.g. "
                f"{', '.join(missing[:3])}); expected a complete SD 2.x checkpoint."
            )


def single_file_config_dir(cache_dir: Path) -> Path:
    """SD 2.1's packaged configs plus the generated tokenizer files: all from_single_file needs, offline.

    Built once into the cache, in a folder named by the packaged files' hash so an upgrade rebuilds it.
    """
    import hashlib
    import shutil

    from sd_endpoint.model.demo import sd21_config_dir
    from sd_endpoint.model.tokenizer import cached_tokenizer_dir

    source = sd21_config_dir()
    digest = hashlib.sha256()
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(f.relative_to(source).as_posix().encode() + b"\0" + f.read_bytes())
    target = cache_dir / f"sd21-config-{digest.hexdigest()[:12]}"
    if (target / "tokenizer" / "merges.txt").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".sd21-config-{time.monotonic_ns()}"
    shutil.copytree(source, tmp)
    tok = cached_tokenizer_dir(cache_dir)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tok / name, tmp / "tokenizer" / name)
    try:
        tmp.rename(target)
    except OSError:  # built concurrently by another worker
        shutil.rmtree(tmp, ignore_errors=True)
    return target
