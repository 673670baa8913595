"""Fast cold start for diffusers folders of safetensors: weights go from disk straight into their final tensors.

``StableDiffusionPipeline.from_pretrained`` builds every module, reads each file into a state dict on the
host (a memory map of the page cache), converts the dtype into new tensors and, for CUDA, copies it all once
more with ``pipe.to``. Here instead:

1. the safetensors headers are read first (a few kB), so every destination tensor is allocated at once on
   the target device, in the target dtype and (for the UNet's and VAE's convolutions, where the backend
   wants it) in NHWC layout;
2. worker threads (``weight_reader.py``) read the files in 16 MiB pieces with ``O_DIRECT`` - from the disk
   into a small aligned staging buffer per worker (pinned for CUDA), bypassing the page cache, which on the
   development VM cut the kernel's CPU time for reading the UNet from 1.1-1.7 s to 0.1 s and halved the read
   time. On the CPU one ``copy_`` per piece converts the dtype and/or changes the layout. On CUDA each raw
   piece is uploaded as it is, with a non-blocking copy from the pinned buffer on the worker's own stream,
   and converted on the GPU; the worker reads the next piece into its other buffer meanwhile, and reuses a
   buffer only after the event recorded behind its upload says the copy finished. No whole-model copy ever
   exists in host memory, and the page cache does not fill up with a second copy of the weights;
3. meanwhile the main thread builds the modules with their parameters on the ``meta`` device (no random
   initialisation, no memory) and then adopts the loaded tensors with ``load_state_dict(assign=True)``
   (``meta_modules.py``).

Reads and conversions release the GIL, so the workers overlap disk, copies and module construction. The
service starts the reading as early as it can: ``start_load`` begins filling the destination tensors as soon
as torch is imported, before diffusers and transformers, whose imports take seconds of single-threaded
Python, and returns the ``PendingLoad``; whoever started it passes it on to ``load_folder`` (through
``loading.load_pipeline(..., early=...)``), which builds the modules and waits for whatever is left. Where
``O_DIRECT`` is refused (tmpfs, some network file systems) the same reads go through the page cache.

Anything this loader does not recognise exactly - ``.bin`` weights, tensor names that differ from the
module's (old checkpoints that need diffusers' key conversions), modules that keep parts in fp32 - raises
``FastLoadUnsupported`` and the caller falls back to ``from_pretrained``; every such refusal is made here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model.meta_modules import adopt, empty_module, match_keys, tokenizer_and_scheduler
from sd_endpoint.model.pipeline import build_pipeline
from sd_endpoint.model.weight_reader import CHUNK_BYTES, Piece, PieceReader, WeightFile
from sd_endpoint.model.weights import COMPONENTS, TensorSpec, read_header, weight_files

log = logging.getLogger(__name__)


class FastLoadUnsupported(Exception):
    """The folder needs something only from_pretrained does; the message says what."""


def folder_weight_files(folder: Path, variant: str | None) -> dict[str, list[Path]]:
    """Each component's safetensors files; FastLoadUnsupported for .bin weights or another layout."""
    out = {}
    for component in COMPONENTS:
        files = weight_files(folder / component, variant)
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise FastLoadUnsupported(
                f"{folder / component}: no safetensors weights (only .bin weights or another layout)"
            )
        out[component] = files
    return out


def _plan_file(
    reader: PieceReader, file: WeightFile, specs: list[TensorSpec], dtype: Any, device: Any, channels_last: bool
) -> dict[str, Any]:
    """Allocate each tensor's destination and queue its pieces; returns name -> destination tensor."""
    torch = reader.torch
    out: dict[str, Any] = {}
    for spec in specs:
        if spec.dtype is None:
            raise FastLoadUnsupported(f"{file.path}: tensor dtype {spec.stored} of {spec.name}")
        src_dtype = getattr(torch, spec.dtype)
        item = src_dtype.itemsize
        numel = 1
        for d in spec.shape:
            numel *= d
        if (spec.end - spec.start) != numel * item:
            raise FastLoadUnsupported(f"tensor {spec.name}: {spec.end - spec.start} bytes for shape {spec.shape}")
        dst_dtype = dtype if src_dtype.is_floating_point else src_dtype
        if channels_last and len(spec.shape) == 4 and src_dtype.is_floating_point:
            # Conv weights straight into NHWC, the layout the backend runs them in: the conversion and the
            # layout change are one pass, instead of a second copy of every conv weight after loading.
            dst = torch.empty(spec.shape, dtype=dst_dtype, device=device, memory_format=torch.channels_last)
            reader.add(Piece(file, spec.start, src_dtype, dst, numel * item))
            out[spec.name] = dst
            continue
        dst = torch.empty(spec.shape, dtype=dst_dtype, device=device)
        out[spec.name] = dst
        flat = dst.view(-1)
        per_piece = max(1, CHUNK_BYTES // item)
        for first in range(0, numel, per_piece):
            count = min(per_piece, numel - first)
            reader.add(Piece(file, spec.start + first * item, src_dtype, flat[first : first + count], count * item))
    return out


def _empty_module(component: str, folder: Path) -> Any:
    """The component without weights; refused when it keeps parts in fp32 (from_pretrained handles that)."""
    module = empty_module(component, folder)
    if getattr(module, "_keep_in_fp32_modules", None):
        raise FastLoadUnsupported(f"{component}: {type(module).__name__} keeps modules in fp32")
    return module


def _state_for(component: str, module: Any, loaded: dict[str, Any]) -> dict[str, Any]:
    """The loaded tensors under the module's names; refused when the names do not match."""
    expected = set(module.state_dict().keys())
    state = match_keys(component, expected, loaded)
    if state is None:
        missing = sorted(expected - set(loaded))[:3]
        extra = sorted(set(loaded) - expected)[:3]
        raise FastLoadUnsupported(
            f"{component}: tensor names differ from the module's (missing {missing}, extra {extra})"
        )
    return state


class PendingLoad:
    """Weights being read into their destination tensors by worker threads; needs only torch.

    Started before diffusers and transformers are imported, it overlaps disk reads and dtype conversion with
    those imports (seconds of single-threaded Python); ``load_folder`` then builds the modules and adopts
    the tensors.
    """

    def __init__(
        self, folder: Path, device: str, dtype_name: str, variant: str | None, *, channels_last: bool = False
    ) -> None:
        import torch

        self.key = (str(folder), device, dtype_name, variant)
        self.channels_last = channels_last
        self.started = time.perf_counter()
        target = torch.device(device)
        if target.type not in ("cpu", "cuda"):
            raise FastLoadUnsupported(f"device {device}")
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        self.target = target
        dtype = getattr(torch, dtype_name)
        files = folder_weight_files(folder, variant)
        self.workers = max(2, min(4, os.cpu_count() or 2))
        self.reader = PieceReader(target, self.workers)
        self._threads = 0
        self.direct = False
        self._files: list[WeightFile] = []
        self.tensors: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
        try:
            # Biggest file first so its pieces start flowing at once.
            order = sorted(((c, f) for c, fs in files.items() for f in fs), key=lambda cf: -cf[1].stat().st_size)
            plans = []
            for comp, path in order:
                self._files.append(WeightFile(path))
                plans.append((comp, self._files[-1], read_header(path)))
            self.direct = all(f.use_direct for f in self._files)
            for comp, file, specs in plans:
                nhwc = channels_last and comp in ("unet", "vae")
                self.tensors[comp].update(_plan_file(self.reader, file, specs, dtype, target, nhwc))
        except BaseException:
            self._close()
            raise
        # The workers already run in parallel; a 16 MiB conversion split over intra-op threads only costs CPU.
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.reader.start()

    def result(self) -> dict[str, dict[str, Any]]:
        """Wait for every piece; raises the first reading error."""
        import torch

        try:
            self.reader.finish()
        finally:
            self._close()
            if self._threads:
                torch.set_num_threads(self._threads)
                self._threads = 0
        return self.tensors

    def _close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def discard(self) -> None:
        """Nobody will adopt these tensors: let the readers finish and drop them."""
        try:
            self.result()
        except Exception:  # noqa: BLE001 - the caller reads again or has failed already
            pass
        self.tensors = {c: {} for c in COMPONENTS}


def start_load(
    folder: Path, device: str, dtype_name: str, variant: str | None = None, *, channels_last: bool = False
) -> PendingLoad | None:
    """Begin reading the weights now (call it right after torch is imported); pass the result on to
    ``load_folder``, which finishes it. None when this folder needs another loader.

    ``channels_last`` puts the UNet's and VAE's conv weights in NHWC as they are read.
    """
    try:
        return PendingLoad(folder, device, dtype_name, variant, channels_last=channels_last)
    except (FastLoadUnsupported, ModelLoadError, OSError, ValueError, KeyError) as exc:
        log.debug("No early weight load: %s", exc)  # loading itself reports what is wrong
        return None


def load_folder(
    folder: Path, device: str, dtype_name: str, variant: str | None = None, *, early: PendingLoad | None = None
) -> Any:
    """Load a diffusers SD folder to ``device``/``dtype_name``; raises FastLoadUnsupported to ask for a fallback.

    Finishes ``early`` (what ``start_load`` began) when it was started for the same arguments, in the memory
    format it chose; otherwise reads the folder now, in the default layout.
    """
    key = (str(folder), device, dtype_name, variant)
    if early is not None and early.key == key:
        pending = early
    else:
        if early is not None:
            early.discard()
        pending = PendingLoad(folder, device, dtype_name, variant)
    try:  # whatever fails here, result() below ends the reads and restores torch's thread count
        index = json.loads((folder / "model_index.json").read_text())
        modules = {c: _empty_module(c, folder) for c in COMPONENTS}
        tokenizer, scheduler = tokenizer_and_scheduler(folder, index)
    finally:
        tensors = pending.result()
    for comp in COMPONENTS:
        module = modules[comp]
        adopt(module, _state_for(comp, module, tensors[comp]), pending.target)
    pipe = build_pipeline(
        "text-to-image",
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=tokenizer,
        unet=modules["unet"],
        scheduler=scheduler,
    )
    pipe.register_to_config(_name_or_path=str(folder))
    log.info(
        "Fast-loaded %.2f GB of weights to %s as %s in %.2f s since the first read (%d reader threads, %s)",
        pending.reader.bytes / 1e9,
        pending.target,
        dtype_name,
        time.perf_counter() - pending.started,
        pending.workers,
        "O_DIRECT" if pending.direct else "page cache",
    )
    return pipe
