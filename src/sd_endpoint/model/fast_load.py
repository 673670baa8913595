"""Fast cold start for diffusers folders of safetensors: weights go from disk straight into their final tensors.

``StableDiffusionPipeline.from_pretrained`` builds every module, reads each file into a state dict on the
host (a memory map of the page cache), converts the dtype into new tensors and, for CUDA, copies it all once
more with ``pipe.to``. Here instead:

1. the safetensors headers are read first (a few kB), so every destination tensor is allocated at once on
   the target device, in the target dtype and (for the UNet's and VAE's convolutions, where the backend
   wants it) in NHWC layout;
2. worker threads read the files in 16 MiB pieces with ``O_DIRECT`` - from the disk into a small aligned
   staging buffer per worker (pinned for CUDA), bypassing the page cache, which on the development VM cut
   the kernel's CPU time for reading the UNet from 1.1-1.7 s to 0.1 s and halved the read time. On the CPU
   one ``copy_`` per piece converts the dtype and/or changes the layout. On CUDA each raw piece is uploaded
   as it is, with a non-blocking copy from the pinned buffer on the worker's own stream, and converted on
   the GPU; the worker reads the next piece into its other buffer meanwhile, and reuses a buffer only after
   the event recorded behind its upload says the copy finished. No whole-model copy ever exists in host
   memory, and the page cache does not fill up with a second copy of the weights;
3. meanwhile the main thread builds the modules with their parameters on the ``meta`` device (no random
   initialisation, no memory) and then adopts the loaded tensors with ``load_state_dict(assign=True)``.

Reads and conversions release the GIL, so the workers overlap disk, copies and module construction. The
service starts the reading as early as it can: ``start_load`` begins filling the destination tensors as soon
as torch is imported, before diffusers and transformers, whose imports take seconds of single-threaded
Python, and returns the ``PendingLoad``; whoever started it passes it on to ``load_folder`` (through
``loader.load_pipeline(..., early=...)``), which builds the modules and waits for whatever is left. Where
``O_DIRECT`` is refused (tmpfs, some network file systems) the same reads go through the page cache.

Anything this loader does not recognise exactly - ``.bin`` weights, tensor names that differ from the
module's (old checkpoints that need diffusers' key conversions), modules that keep parts in fp32 - raises
``FastLoadUnsupported`` and the caller falls back to ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model.pipeline import build_pipeline
from sd_endpoint.model.weights import COMPONENTS, TensorSpec, read_header, weight_files

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
# Keys that older transformers versions saved but current modules recompute (non-persistent buffers).
_IGNORABLE_SUFFIXES = ("position_ids",)


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


# ------------------------------------------------------------------------------------------------
# Reading into destination tensors


ALIGN = 4096  # O_DIRECT: file offset, length and buffer address all aligned to the logical block size


class _File:
    """One weight file, opened for O_DIRECT reads where the file system allows them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.direct_fd: int | None = None
        flag = getattr(os, "O_DIRECT", 0)
        if flag:
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | flag)
            except OSError:  # EINVAL on tmpfs and some others: the buffered fd does
                self.direct_fd = None
        self.use_direct = self.direct_fd is not None  # cleared (not closed: other workers) on a refused read

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None
        self.use_direct = False


@dataclass
class _Piece:
    file: _File
    offset: int  # file offset of the first byte
    src_dtype: Any
    dst: Any  # the destination: a flat slice of a tensor, or a whole (NHWC) tensor
    nbytes: int


def _pread_into(fd: int, view: memoryview, offset: int, need: int) -> int:
    """Read into ``view`` from ``offset`` until at least ``need`` bytes arrived; returns the bytes read."""
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n
    return done


class _Staging:
    """A page-aligned bounce buffer (pinned when the destination is a GPU), grown on demand."""

    def __init__(self, torch: Any, pinned: bool) -> None:
        self.torch = torch
        self.pinned = pinned
        self.buf: Any = None
        self.event: Any = None  # CUDA: recorded behind the upload that reads this buffer

    def get(self, size: int) -> Any:
        if self.buf is None or self.buf.numel() < size:
            raw = self.torch.empty(max(size, CHUNK_BYTES) + 2 * ALIGN, dtype=self.torch.uint8, pin_memory=self.pinned)
            pad = -raw.data_ptr() % ALIGN
            self.buf = raw[pad : pad + raw.numel() - 2 * ALIGN]
        return self.buf[:size]


class _StagingRing:
    """A worker's staging buffers, used in turn; a buffer is handed out again only once its upload is done."""

    def __init__(self, torch: Any, pinned: bool, slots: int) -> None:
        self.slots = [_Staging(torch, pinned) for _ in range(slots)]
        self.next = 0

    def acquire(self) -> _Staging:
        slot = self.slots[self.next]
        self.next = (self.next + 1) % len(self.slots)
        if slot.event is not None:
            slot.event.synchronize()  # the non-blocking copy out of this buffer has finished
            slot.event = None
        return slot


def _read(piece: _Piece, staging: _Staging) -> Any:
    """The piece's bytes as a uint8 tensor (a view of the staging buffer)."""
    f, offset, n = piece.file, piece.offset, piece.nbytes
    if f.use_direct and f.direct_fd is not None:
        start = offset - offset % ALIGN
        end = -(-(offset + n) // ALIGN) * ALIGN
        buf = staging.get(end - start)
        try:
            # The last block may run past the end of the file: a short read there is fine.
            _pread_into(f.direct_fd, memoryview(buf.numpy()), start, offset + n - start)
            return buf[offset - start : offset - start + n]
        except OSError as exc:
            if exc.errno is None:  # a real short read: the file is truncated
                raise
            f.use_direct = False  # EINVAL and the like: this file system wants buffered reads
            log.info("O_DIRECT read of %s refused (%s); reading through the page cache", f.path, exc)
    buf = staging.get(n)
    _pread_into(f.fd, memoryview(buf.numpy()), offset, n)
    return buf


class _Reader:
    """Worker threads that fill destination tensors from file pieces."""

    def __init__(self, device: Any, workers: int) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.workers = workers
        self.pieces: queue.Queue[_Piece | None] = queue.Queue()
        self.errors: list[BaseException] = []
        self.bytes = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def add(self, piece: _Piece) -> None:
        self.pieces.put(piece)

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"weights-read-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def finish(self) -> None:
        for _ in self._threads:
            self.pieces.put(None)
        for t in self._threads:
            t.join()
        if self.errors:
            raise self.errors[0]

    def _work(self) -> None:
        torch = self.torch
        cuda = self.device.type == "cuda"
        # CUDA: two pinned buffers (one uploading while the next piece is read into the other), own stream.
        ring = _StagingRing(torch, pinned=cuda, slots=2 if cuda else 1)
        stream = torch.cuda.Stream(device=self.device) if cuda else None
        try:
            while True:
                piece = self.pieces.get()
                if piece is None:
                    return
                if self.errors:
                    continue
                try:
                    staging = ring.acquire()
                    raw = _read(piece, staging)
                    if stream is None:
                        # dtype conversion and/or layout change in one pass on the CPU
                        piece.dst.copy_(raw.view(piece.src_dtype).view(piece.dst.shape))
                    else:
                        staging.event = _upload(torch, stream, raw, piece)
                    with self._lock:
                        self.bytes += piece.nbytes
                except BaseException as exc:  # noqa: BLE001 - re-raised by finish() on the caller's thread
                    self.errors.append(exc)
        finally:
            if stream is not None:
                stream.synchronize()  # every upload and conversion of this worker is done


def _upload(torch: Any, stream: Any, raw: Any, piece: _Piece) -> Any:
    """Copy the raw bytes to the GPU without blocking, convert there; returns the event behind the copy."""
    with torch.cuda.stream(stream):
        on_device = torch.empty(raw.numel(), dtype=torch.uint8, device=piece.dst.device)
        on_device.copy_(raw, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
        # Conversion (and NHWC layout) on the GPU; ``on_device`` is freed in this stream's order.
        piece.dst.copy_(on_device.view(piece.src_dtype).view(piece.dst.shape))
    return copied


def _plan_file(
    reader: _Reader, file: _File, specs: list[TensorSpec], dtype: Any, device: Any, channels_last: bool
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
            reader.add(_Piece(file, spec.start, src_dtype, dst, numel * item))
            out[spec.name] = dst
            continue
        dst = torch.empty(spec.shape, dtype=dst_dtype, device=device)
        out[spec.name] = dst
        flat = dst.view(-1)
        per_piece = max(1, CHUNK_BYTES // item)
        for first in range(0, numel, per_piece):
            count = min(per_piece, numel - first)
            reader.add(_Piece(file, spec.start + first * item, src_dtype, flat[first : first + count], count * item))
    return out


# ------------------------------------------------------------------------------------------------
# Modules


def _empty_module(component: str, folder: Path) -> Any:
    """The component's module with parameters on the meta device (buffers real), from its config."""
    from accelerate import init_empty_weights

    comp_dir = folder / component
    with init_empty_weights(include_buffers=False):
        if component == "text_encoder":
            import transformers

            config = transformers.AutoConfig.from_pretrained(str(comp_dir), local_files_only=True)
            cls = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])
            with _no_init_weights():  # every weight is loaded next; skip transformers' initialisation pass
                module = cls(config)
        else:
            import diffusers

            config_dict = json.loads((comp_dir / "config.json").read_text())
            cls = getattr(diffusers, config_dict["_class_name"])
            module = cls.from_config(config_dict)
            module.register_to_config(_name_or_path=str(comp_dir))  # as from_pretrained records it
    if getattr(module, "_keep_in_fp32_modules", None):
        raise FastLoadUnsupported(f"{component}: {type(module).__name__} keeps modules in fp32")
    return module


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # older transformers: initialise (on meta, so only time is lost)
        import contextlib

        return contextlib.nullcontext()


def _match_keys(component: str, expected: set[str], loaded: dict[str, Any]) -> dict[str, Any]:
    """Map the file's tensor names onto the module's: as is, or with transformers 4's ``text_model.`` prefix."""
    candidates = [loaded]
    if component == "text_encoder":
        p = "text_model."
        candidates.append({k.removeprefix(p): v for k, v in loaded.items()})
        candidates.append({(k if k.startswith(p) else p + k): v for k, v in loaded.items()})
    for cand in candidates:
        kept = {k: v for k, v in cand.items() if k in expected or not k.endswith(_IGNORABLE_SUFFIXES)}
        if set(kept) == expected:
            return kept
    missing = sorted(expected - set(loaded))[:3]
    extra = sorted(set(loaded) - expected)[:3]
    raise FastLoadUnsupported(f"{component}: tensor names differ from the module's (missing {missing}, extra {extra})")


def _adopt(module: Any, state: dict[str, Any], device: Any) -> Any:
    module.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.device != device:  # non-persistent buffers (e.g. CLIP's position_ids) were built on the CPU
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            owner._buffers[name.rpartition(".")[2]] = buf.to(device)
    module.eval()
    module.requires_grad_(False)
    return module


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
        self.reader = _Reader(target, self.workers)
        self._threads = 0
        self.direct = False
        self._files: list[_File] = []
        self.tensors: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
        try:
            # Biggest file first so its pieces start flowing at once.
            order = sorted(((c, f) for c, fs in files.items() for f in fs), key=lambda cf: -cf[1].stat().st_size)
            plans = []
            for comp, path in order:
                self._files.append(_File(path))
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
        tokenizer, scheduler = _tokenizer_and_scheduler(folder, index)
    finally:
        tensors = pending.result()
    for comp in COMPONENTS:
        module = modules[comp]
        state = _match_keys(comp, set(module.state_dict().keys()), tensors[comp])
        _adopt(module, state, pending.target)
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


def _tokenizer_and_scheduler(folder: Path, index: dict[str, Any]) -> tuple[Any, Any]:
    import diffusers
    import transformers

    tok_cls = getattr(transformers, str(index.get("tokenizer", [None, "CLIPTokenizer"])[1]))
    tokenizer = tok_cls.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    sched_cls = getattr(diffusers, str(index.get("scheduler", [None, "DDIMScheduler"])[1]))
    scheduler = sched_cls.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    return tokenizer, scheduler
