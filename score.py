"""Azure ML entry script for the inference server (``azmlinfsrv --entry_script score.py``).

A thin envelope: ``init()`` builds the one GenerationService, ``run()`` hands it the request body and
turns its records or errors into an ``AMLResponse``. No exception leaves ``run()``: the server would turn
it into an opaque 500, and a bad request must say what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

from sd_endpoint.cpu_policy import prefer_passive_waits, share_cores_between_workers

prefer_passive_waits()  # before anything imports torch (see sd_endpoint.cpu_policy)

from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp  # noqa: E402
from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from sd_endpoint.errors import EndpointError, RequestTimeout, UnsupportedMediaType  # noqa: E402
from sd_endpoint.logs import request_id, setup_logging  # noqa: E402
from sd_endpoint.service import GenerationService  # noqa: E402
from sd_endpoint.settings import load_settings  # noqa: E402

log = logging.getLogger("sd_endpoint.score")
_service: GenerationService | None = None


def init() -> None:
    """Load the model once per worker, warm it up, and log what was chosen."""
    global _service
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format, defer_to_host=True)
    # azmlinfsrv runs WORKER_COUNT processes, each with its own model: each gets its share of the cores.
    share_cores_between_workers(_worker_count())
    _service = GenerationService.from_settings(settings)
    _service.warmup()


def _worker_count() -> int:
    try:
        return max(1, int(os.environ.get("WORKER_COUNT", "1")))
    except ValueError:
        return 1  # azmlinfsrv itself rejects such a value before calling init()


@rawhttp
def run(request: AMLRequest) -> AMLResponse:
    """POST /score: the Azure ML scoring contract (see sd_endpoint.contract)."""
    rid = request.headers.get("x-request-id") or str(uuid.uuid4())
    token = request_id.set(rid)
    try:
        if _service is None:
            raise EndpointError("The model is not loaded: init() did not run.")
        if request.method != "POST":
            return _json({"message": "Use POST with a JSON body."}, 405, {"Allow": "POST"})
        ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json":
            raise UnsupportedMediaType(f"Content-Type must be application/json (got {ctype!r}).")
        body = request.get_data(cache=False)
        cancel = _service.new_cancel_token()
        result = _service.handle(body, cancel)
        log.info(
            "scored",
            extra={
                "status": 200,
                "images": result.images,
                "steps": result.steps,
                "blocked": result.blocked,
                "timings": {k: round(v, 3) for k, v in result.timings.items()},
            },
        )
        return _json(result.records, 200, result.headers)
    except RequestTimeout as exc:
        # azure-ai-ml's online_endpoints.invoke() turns every 408 into a TypeError (it builds its timeout error
        # without a message), while a 500 becomes a readable HttpResponseError. azmlinfsrv answers its own
        # scoring timeout (SCORING_TIMEOUT_MS) with 500 {"message": ...}: this one is answered the same way.
        log.info("request timed out: %s", exc.message, extra={"status": 500})
        return _json({"message": f"Scoring timeout: {exc.body()['message']}"}, 500, exc.headers, failed=True)
    except EndpointError as exc:
        log.info("request failed: %s", exc.message, extra={"status": exc.status_code})
        return _json(exc.body(), exc.status_code, exc.headers, failed=exc.status_code >= 500)
    except Exception:
        log.exception("Unexpected error while scoring")
        return _json(
            {"message": f"Generation failed unexpectedly; see the server log (request id {rid})."}, 500, failed=True
        )
    finally:
        request_id.reset(token)


def _json(body: Any, status: int, headers: dict[str, str] | None = None, *, failed: bool = False) -> AMLResponse:
    merged = {"Content-Type": "application/json", **(headers or {})}
    # AMLResponse splits header values on commas; our values never contain one.
    return AMLResponse(json.dumps(body), status, merged, run_function_failed=failed)
