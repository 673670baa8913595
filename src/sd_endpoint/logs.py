"""Logging: stdlib ``logging`` (Azure ML, App Insights and uvicorn hook into it), text or JSON lines,
with the request id of the request being served on every line."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# uvicorn adds "color_message" (its line with ANSI colours) to its records; never an extra of ours.
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {
            k: v
            for k, v in record.__dict__.items()
            if k not in _RESERVED and k != "request_id" and not k.startswith("_")
        }
        if extras:
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extras.items())
        return line


def setup_logging(level: str = "INFO", fmt: str = "text", *, defer_to_host: bool = False) -> None:
    """Configure the root logger once; safe to call again (replaces our handler).

    ``defer_to_host``: inside a host that already set up logging (azmlinfsrv), only set our level, so
    every line is written once, by the host's handlers (which App Insights also reads).
    """
    quiet_third_party_notices()
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_sd_endpoint", False)]
    if defer_to_host and len(root.handlers) > len(ours):
        logging.getLogger("sd_endpoint").setLevel(level.upper())
        return
    for handler in list(root.handlers):
        if getattr(handler, "_sd_endpoint", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._sd_endpoint = True  # type: ignore[attr-defined]
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "azure.core.pipeline.policies.http_logging_policy", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


_NOTICES = {
    # transformers 5 warns once per image-processor class it maps to its PIL variant when torchvision is
    # missing; the pipeline loads no image processor (no safety checker), so there is nothing to act on.
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    # Importing diffusers imports torchao's optional kernels (CUDA builds) and its quantizer types; we load
    # no torchao-quantized checkpoint.
    "torchao": ("Failed to load",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    # torchao registers enums the way torch 2.13 deprecates; a library notice, not ours to fix.
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    # Probing for DeepSpeed on a machine without CUDA; the backend choice is logged by us, once.
    "DeepSpeed": ("Setting accelerator to CPU",),
}


def quiet_third_party_notices() -> None:
    """Drop third-party start-up notices a user cannot act on (each named in _NOTICES); idempotent."""
    for name, fragments in _NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*fragments))
