"""Azure ML batch endpoint scoring script: ``init()`` once per process, ``run(mini_batch)`` per list of files.

Each input file (.csv / .jsonl / .txt, see ``sd_endpoint.batch.inputs``) gives one image per row, written as
a PNG into the job's output folder (``AZUREML_BI_OUTPUT_PATH``), and one line per row for ``predictions.csv``
(``output_action: append_row``) with exactly the five fields Azure's own text-to-image batch scoring writes::

    row_number_per_file,prompt,generated_image,nsfw_content_detected,input_file

Every other field (input line, seed, status ok/exists/blocked/error, error text) goes to
``predictions_details.csv`` next to it, with a header, appended once per finished mini-batch.

Bad files and rows come back as rows with an empty image and the reason in the details; they never fail the
mini-batch (unless ``SD_ENDPOINT_BATCH_FAIL_ON_BAD_INPUT=true``). A failure that is not the input's fault
raises, so Azure retries the mini-batch (``retry_settings``) and counts it against ``error_threshold``;
images already written are not generated again on the retry.

Azure's batch driver needs ``azureml-core`` and ``azureml-dataset-runtime[fuse]``, whose pins conflict with
the model stack (numpy, packaging, azure-identity). The batch image therefore keeps them in a separate
environment: when ``SD_ENDPOINT_BATCH_PYTHON`` names the model environment's interpreter, this script stays
stdlib-only and runs the generation in a worker process there (``python -m sd_endpoint.batch --worker``).
Without it, everything runs in this process.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import time
from typing import Any, Protocol

log = logging.getLogger("sd_endpoint.batch_score")


class _Runner(Protocol):
    def run(self, files: list[str]) -> list[list[Any]]: ...

    def close(self) -> None: ...


class _InProcess:
    def __init__(self) -> None:
        from sd_endpoint.cpu_policy import prefer_passive_waits

        prefer_passive_waits()  # before the runner imports torch (see sd_endpoint.cpu_policy)
        from sd_endpoint.batch import BatchRunner
        from sd_endpoint.logs import setup_logging
        from sd_endpoint.settings import load_settings

        settings = load_settings()
        # Azure's driver may have configured logging already: then its handlers write our lines, once.
        setup_logging(settings.log_level, settings.log_format, defer_to_host=True)
        self.runner = BatchRunner.from_env()

    def run(self, files: list[str]) -> list[list[Any]]:
        from pathlib import Path

        rows, summary = self.runner.run_mini_batch([Path(f) for f in files])
        log.info("mini-batch done: %s", summary.text())
        return [r.as_list() for r in rows]

    def close(self) -> None:
        self.runner.service.close()


class _Worker:
    """The batch core in the model environment's interpreter, behind a JSON-lines pipe."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[str]:
        started = time.perf_counter()
        # stderr is inherited: the worker's log lines land in the job's logs.
        proc = subprocess.Popen(
            [self.python, "-m", "sd_endpoint.batch", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        hello = self._read(proc)
        if not hello.get("ready"):
            proc.wait(timeout=30)
            raise RuntimeError(f"The batch worker ({self.python}) did not start: {hello.get('error', hello)}")
        log.info("Batch worker %s ready in %.1f s", proc.pid, time.perf_counter() - started)
        return proc

    @staticmethod
    def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            code = proc.wait(timeout=30)
            raise RuntimeError(f"The batch worker exited (code {code}); see its log above.")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self, files: list[str]) -> list[list[Any]]:
        if self.proc.poll() is not None:  # it died on an earlier mini-batch: start afresh
            self.proc = self._start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"files": files}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(self.proc)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        rows: list[list[Any]] = reply["rows"]
        return rows

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_runner: _Runner | None = None


def init() -> None:
    """Load the model once for this process (Azure may run several per node: max_concurrency_per_instance)."""
    global _runner
    python = os.environ.get("SD_ENDPOINT_BATCH_PYTHON")
    if python:
        if not logging.getLogger().handlers:  # only this script logs here; the worker logs on its own
            logging.basicConfig(
                level=os.environ.get("SD_ENDPOINT_LOG_LEVEL", "INFO").upper(),
                format="%(asctime)s %(levelname)s %(name)s %(message)s",
            )
        _runner = _Worker(python)
    else:
        _runner = _InProcess()


def run(mini_batch: list[Any]) -> list[str]:
    """One CSV line (no header, Azure's five fields) per input row; Azure appends them to predictions.csv."""
    if _runner is None:
        raise RuntimeError("init() did not run")
    rows = _runner.run([os.fspath(p) for p in mini_batch])
    return [_csv_line(r) for r in rows]


def shutdown() -> None:
    """Called by Azure's driver at the end (when it supports it); also handy in tests."""
    global _runner
    if _runner is not None:
        _runner.close()
        _runner = None


def _csv_line(values: list[Any]) -> str:
    buf = io.StringIO()
    # The writer quotes a field only if it holds a character of its lineterminator: "" would leave "\n" bare.
    csv.writer(buf, lineterminator="\r\n").writerow(values)
    return buf.getvalue()[:-2]
