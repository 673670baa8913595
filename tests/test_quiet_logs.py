"""Start-up logs show what a user can act on: third-party notices dropped, probes at DEBUG, one line per event."""

from __future__ import annotations

import logging

import pytest

from sd_endpoint.logs import setup_logging


def test_third_party_notices_are_dropped_and_other_warnings_kept(caplog: pytest.LogCaptureFixture) -> None:
    setup_logging("INFO")
    notices = {
        "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back",
        "torchao": "Failed to load /x/torchao/_C_mxfp8.so: Could not load this library",
        "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may",
        "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by",
        "DeepSpeed": "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    }
    with caplog.at_level(logging.INFO):
        for name, text in notices.items():
            logging.getLogger(name).warning(text)
            logging.getLogger(name).warning("something else went wrong")  # not a known notice: kept
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"] * len(notices)
    setup_logging("INFO")  # idempotent: one filter per logger
    assert len(logging.getLogger("torchao").filters) == 1


@pytest.mark.parametrize(
    ("path", "status", "level"),
    [
        ("/ready", 503, "DEBUG"),
        ("/", 503, "DEBUG"),
        ("/ready", 200, "DEBUG"),
        ("/score", 503, "INFO"),
        ("/score", 200, "INFO"),
    ],
)
def test_probes_are_logged_at_debug_even_while_warming_up(
    path: str, status: int, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    from sd_endpoint.server.middleware import RequestContextMiddleware

    with caplog.at_level(logging.DEBUG, logger="sd_endpoint.access"):
        RequestContextMiddleware._log({"method": "GET"}, path, status, 0.001, {"x-request-id": "r"}, {})
    assert [r.levelname for r in caplog.records] == [level]
