"""The runner behind a pipe, for ``batch_score.py`` when Azure's batch driver runs in another interpreter.

Protocol, one JSON object per line. Worker -> driver first: ``{"ready": true}`` (or ``{"error": ...}`` and
exit 2). Driver -> worker: ``{"files": [paths]}``; worker -> driver: ``{"rows": [[...five predictions.csv
fields]]}`` (the details file is appended here) or ``{"error": message, "kind": "input"|"failure"}``. EOF on
stdin ends the worker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sd_endpoint.batch.runner import BatchInputError, BatchRunner

log = logging.getLogger("sd_endpoint.batch")


def worker_main() -> int:
    from sd_endpoint.logs import setup_logging

    # Keep the protocol channel private: anything a library prints goes to stderr (the job's log).
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    setup_logging(os.environ.get("SD_ENDPOINT_LOG_LEVEL", "INFO"), os.environ.get("SD_ENDPOINT_LOG_FORMAT", "text"))

    def send(obj: dict[str, Any]) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        runner = BatchRunner.from_env()
    except Exception as exc:  # reported to the driver, which fails init() with it
        log.exception("Batch worker could not start")
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 2
    send({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            files = [Path(f) for f in json.loads(line)["files"]]
            rows, summary = runner.run_mini_batch(files)
            log.info("mini-batch done: %s", summary.text())
            send({"rows": [r.as_list() for r in rows]})
        except BatchInputError as exc:
            send({"error": str(exc), "kind": "input"})
        except Exception as exc:
            log.exception("Batch worker failed on a mini-batch")
            send({"error": f"{type(exc).__name__}: {exc}", "kind": "failure"})
    return 0
