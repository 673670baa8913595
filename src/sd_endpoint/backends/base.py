"""The engine interface: what a backend must do. The work types it takes live in ``sd_endpoint.jobs``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from sd_endpoint.jobs import BatchResult, CancelToken, GenerationSpec, ImageTask, StepCallback


@runtime_checkable
class Backend(Protocol):
    """A loaded text-to-image engine. Implementations must be safe to call from several threads."""

    name: str

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at; the default output size."""
        ...

    def describe(self) -> dict[str, Any]:
        """What was loaded and why (device, dtype, backend choice), for logs, /ready and metrics."""
        ...

    def prompt_overflows(self, text: str) -> bool:
        """True when the text is longer than the text encoder's window and will be truncated."""
        ...

    def supports(self, spec: GenerationSpec) -> bool:
        """Whether this backend can run the spec (the DeepSpeed path only runs captured shapes)."""
        ...

    def generate(
        self,
        spec: GenerationSpec,
        tasks: Sequence[ImageTask],
        cancel: CancelToken | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        """Generate one image per task in one pipeline call, in task order."""
        ...
