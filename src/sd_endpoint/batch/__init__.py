"""Batch generation: the core shared by ``batch_score.py`` (Azure ML batch endpoints) and ``sd-endpoint batch``.

* ``inputs``: reading .csv / .jsonl / .txt prompt files into rows (file, line, 0-based row number);
* ``predictions``: prediction rows, ``predictions.csv`` (Azure's five fields) and ``predictions_details.csv``;
* ``runner``: ``BatchRunner``, files in, images and rows out, resumable;
* ``worker``: the runner behind a pipe (``python -m sd_endpoint.batch --worker``) for ``batch_score.py``;
* ``cli``: ``sd-endpoint batch INPUT OUTPUT``; ``settings``: ``SD_ENDPOINT_BATCH_*``; ``gpu_slots``: one GPU
  per process.

Importing this package stays cheap (no torch): ``sd-endpoint --help`` imports it to register ``batch``.
"""

from __future__ import annotations

from sd_endpoint.batch.cli import register_cli
from sd_endpoint.batch.inputs import InputRow, derived_seed, image_name, input_files, read_input
from sd_endpoint.batch.predictions import (
    DETAIL_COLUMNS,
    DETAILS_FILE,
    PREDICTION_COLUMNS,
    PREDICTIONS_FILE,
    Prediction,
    read_details,
    read_predictions,
    write_predictions,
)
from sd_endpoint.batch.runner import BatchInputError, BatchRunner, Summary
from sd_endpoint.batch.settings import BatchSettings

__all__ = [
    "DETAILS_FILE",
    "DETAIL_COLUMNS",
    "PREDICTIONS_FILE",
    "PREDICTION_COLUMNS",
    "BatchInputError",
    "BatchRunner",
    "BatchSettings",
    "InputRow",
    "Prediction",
    "Summary",
    "derived_seed",
    "image_name",
    "input_files",
    "read_details",
    "read_input",
    "read_predictions",
    "register_cli",
    "write_predictions",
]
