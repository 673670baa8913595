"""The micro-batcher merges only requests of the same task, strength and size."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from PIL import Image

from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask
from sd_endpoint.server.microbatch import MicroBatcher, Outcome


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
    results: dict[str, Outcome] = {}

    async def scenario() -> None:
        batcher = MicroBatcher(fake.generate, max_batch_size=8, batch_wait_s=0.0).start()

        async def submit(name: str, spec: GenerationSpec, seed: int) -> None:
            task = ImageTask(name, None, seed, None if spec.task == "text-to-image" else picture,
                             mask if spec.task == "inpainting" else None)  # fmt: skip
            results[name] = await batcher.submit(spec, [task], CancelToken()).result

        try:
            waits = [asyncio.ensure_future(submit("hold", text, 0))]
            while not fake.entered.is_set():
                await asyncio.sleep(0.01)
            jobs = [("t1", text), ("i1", i2i), ("p1", inpaint), ("i2", i2i), ("s1", i2i_other_strength), ("t2", text)]
            waits += [asyncio.ensure_future(submit(name, spec, n)) for n, (name, spec) in enumerate(jobs, 1)]
            await asyncio.sleep(0)  # every job is submitted (queued behind the held call)
            assert batcher.queued == len(jobs)
            fake.gate.set()
            await asyncio.wait_for(asyncio.gather(*waits), 60)
        finally:
            fake.gate.set()
            await asyncio.to_thread(batcher.close)

    asyncio.run(scenario())
    merged = [sorted(t.prompt for t in tasks) for _, tasks in fake.calls]
    assert merged == [["hold"], ["t1", "t2"], ["i1", "i2"], ["p1"], ["s1"]]
    for spec, tasks in fake.calls:
        assert all((t.image is None) == (spec.task == "text-to-image") for t in tasks)
    assert set(results) == {"hold", "t1", "i1", "p1", "i2", "s1", "t2"}
