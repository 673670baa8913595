"""Fault injection: the failures the emulator can be told to produce, and the error answers they send.

``down`` drops the connection with no answer, ``slow`` answers late, the others answer with that HTTP
status and the service's error body (``429`` with Retry-After). A fault applies to every analyze call of
its target until cleared, or to the next ``count`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aacs_emulator.api import INVALID_KEY, ApiError

FaultMode = Literal["down", "slow", "500", "503", "429", "401", "403"]
FAULT_MODES: tuple[str, ...] = ("down", "slow", "500", "503", "429", "401", "403")
FaultTarget = Literal["all", "text", "image"]


@dataclass
class Fault:
    """An injected failure: ``count`` matching calls (None: until cleared) fail as ``mode``."""

    mode: FaultMode
    target: FaultTarget = "all"
    delay_s: float = 5.0  # for "slow"
    count: int | None = None
    retry_after_s: int = 1  # for "429"

    def applies(self, kind: str) -> bool:
        return self.target in ("all", kind)


_FAULT_ERRORS: dict[str, tuple[int, str, str]] = {
    "500": (500, "InternalError", "The server encountered an internal error (emulated)."),
    "503": (503, "ServiceUnavailable", "The service is temporarily unavailable (emulated)."),
    "429": (429, "TooManyRequests", "Rate limit is exceeded (emulated). Try again later."),
    "401": (401, "401", INVALID_KEY),
    "403": (403, "403", "The principal does not have access to this resource (emulated)."),
}


def fault_error(fault: Fault) -> ApiError:
    """The error answer of a fault that answers (every mode but ``down`` and ``slow``)."""
    status, code, message = _FAULT_ERRORS[fault.mode]
    headers = {"Retry-After": str(fault.retry_after_s)} if fault.mode == "429" else {}
    return ApiError(status, code, message, headers)


def fault_json(fault: Fault | None) -> dict[str, Any] | None:
    """The fault as the admin routes show it; None when there is none."""
    if fault is None:
        return None
    return {
        "mode": fault.mode,
        "target": fault.target,
        "delay_s": fault.delay_s,
        "count": fault.count,
        "retry_after_s": fault.retry_after_s,
    }
