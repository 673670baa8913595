"""The micro-batcher merges only requests of the same task, strength and size."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from PIL import Image

from sd_endpoint.batching import MicroBatcher
from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask


class GatedBackend:
    """Records each call; the first call waits at its start until the gate opens, so later jobs queue up."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[GenerationSpec, list[ImageTask]]] = []

    def generate(
        self, spec: GenerationSpec, tasks: Sequence[ImageTask], cancel: CancelToken | None = None, on_step: Any = None
    ) -> BatchResult:
        self.entered.set()
        assert self.gate.wait(60)
        self.calls.append((spec, list(tasks)))
        return BatchResult([Image.new("RGB", (spec.width, spec.height)) for _ in tasks], spec.denoising_steps, 0.0)


def test_only_jobs_of_one_task_and_strength_merge() -> None:
    text = GenerationSpec(64, 64, 4, 7.5, "ddim", 0.0)
    i2i = GenerationSpec(64, 64, 4, 7.5, "ddim", 0.0, "image-to-image", 0.5)
    i2i_other_strength = GenerationSpec(64, 64, 4, 7.5, "ddim", 0.0, "image-to-image", 0.75)
    inpaint = GenerationSpec(64, 64, 4, 7.5, "ddim", 0.0, "inpainting", 0.5)
    picture, mask = Image.new("RGB", (64, 64), "red"), Image.new("L", (64, 64), 255)
    fake = GatedBackend()
    batcher = MicroBatcher(fake.generate, max_batch_size=8, batch_wait_s=0.0).start()
    results: dict[str, BatchResult] = {}

    def submit(name: str, spec: GenerationSpec, seed: int) -> threading.Thread:
        task = ImageTask(name, None, seed, None if spec.task == "text-to-image" else picture,
                         mask if spec.task == "inpainting" else None)  # fmt: skip
        thread = threading.Thread(target=lambda: results.update({name: batcher.generate(spec, [task])}))
        thread.start()
        return thread

    try:
        threads = [submit("hold", text, 0)]
        assert fake.entered.wait(60)
        jobs = [("t1", text), ("i1", i2i), ("p1", inpaint), ("i2", i2i), ("s1", i2i_other_strength), ("t2", text)]
        threads += [submit(name, spec, n) for n, (name, spec) in enumerate(jobs, 1)]
        deadline = threading.Event()
        for _ in range(600):
            if batcher.queued == len(jobs):
                break
            deadline.wait(0.05)
        assert batcher.queued == len(jobs)
        fake.gate.set()
        for thread in threads:
            thread.join(60)
    finally:
        fake.gate.set()
        batcher.close()
    merged = [sorted(t.prompt for t in tasks) for _, tasks in fake.calls]
    assert merged == [["hold"], ["t1", "t2"], ["i1", "i2"], ["p1"], ["s1"]]
    for spec, tasks in fake.calls:
        assert all((t.image is None) == (spec.task == "text-to-image") for t in tasks)
    assert set(results) == {"hold", "t1", "i1", "p1", "i2", "s1", "t2"}
