"""Reading byte ranges of weight files straight into their destination tensors, on worker threads.

The fast loader (``fast_load.py``) cuts every tensor into ``Piece``s and queues them on a ``PieceReader``.
Each worker reads a piece with ``O_DIRECT`` into its own page-aligned staging buffer (bypassing the page
cache; buffered reads where the file system refuses it) and converts it into the destination: one
``copy_`` on the CPU, or on CUDA a non-blocking upload from a pinned buffer on the worker's own stream,
converted on the GPU, while the next piece is read into the worker's other buffer. Reads and copies release
the GIL, so the workers overlap disk, conversion and whatever the main thread does meanwhile.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
ALIGN = 4096  # O_DIRECT: file offset, length and buffer address all aligned to the logical block size


class WeightFile:
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
class Piece:
    """A run of one tensor's bytes in a file, and the destination they are converted into."""

    file: WeightFile
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


class StagingRing:
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


def _read(piece: Piece, staging: _Staging) -> Any:
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


class PieceReader:
    """Worker threads that fill destination tensors from file pieces."""

    def __init__(self, device: Any, workers: int) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.workers = workers
        self.pieces: queue.Queue[Piece | None] = queue.Queue()
        self.errors: list[BaseException] = []
        self.bytes = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def add(self, piece: Piece) -> None:
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
        ring = StagingRing(torch, pinned=cuda, slots=2 if cuda else 1)
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


def _upload(torch: Any, stream: Any, raw: Any, piece: Piece) -> Any:
    """Copy the raw bytes to the GPU without blocking, convert there; returns the event behind the copy."""
    with torch.cuda.stream(stream):
        on_device = torch.empty(raw.numel(), dtype=torch.uint8, device=piece.dst.device)
        on_device.copy_(raw, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
        # Conversion (and NHWC layout) on the GPU; ``on_device`` is freed in this stream's order.
        piece.dst.copy_(on_device.view(piece.src_dtype).view(piece.dst.shape))
    return copied
