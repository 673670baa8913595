"""``sd-endpoint batch INPUT OUTPUT``: the runner over local files, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sd_endpoint.batch.inputs import input_files
from sd_endpoint.batch.predictions import DETAILS_FILE, write_predictions
from sd_endpoint.batch.runner import MAX_REPORTED, BatchRunner
from sd_endpoint.batch.settings import BatchSettings
from sd_endpoint.cli_options import add_model_options, settings_overrides
from sd_endpoint.errors import ConfigError


def load_parameters(value: str | None) -> dict[str, Any]:
    """``--parameters``: a JSON object, or ``@file.json``."""
    if not value:
        return {}
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--parameters: not valid JSON ({exc}).") from None
    if not isinstance(params, dict):
        raise ConfigError('--parameters: expected a JSON object, e.g. {"num_inference_steps": 30}.')
    return params


def _cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sd_endpoint.service import GenerationService
    from sd_endpoint.settings import load, load_settings

    files = input_files(Path(args.input))
    out_dir = Path(args.output)
    params = {**load(BatchSettings).parameters, **load_parameters(args.parameters)}
    service = GenerationService.from_settings(load_settings(warmup=False, **settings_overrides(args)))
    try:
        runner = BatchRunner(service, out_dir, params)
        total = runner.pending_images(files)
        with tqdm(total=total, unit="img", desc="generating", disable=args.quiet) as bar:
            rows, summary = runner.run_files(files, progress=bar.update)
    finally:
        service.close()
    predictions = write_predictions(out_dir, rows)
    for problem in summary.problems[:MAX_REPORTED]:
        sys.stderr.write(f"error: {problem}\n")
    if len(summary.problems) > MAX_REPORTED:
        sys.stderr.write(f"... and {len(summary.problems) - MAX_REPORTED} more (see {DETAILS_FILE})\n")
    sys.stderr.write(summary.text() + "\n")
    sys.stdout.write(f"{predictions}\n")
    return 1 if summary.errors else 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "batch",
        help="Generate an image for every prompt in a folder of .csv/.jsonl/.txt files (resumable).",
        description="Reads INPUT (a file or a folder of .csv, .jsonl and .txt files), writes one image per row "
        f"into OUTPUT, OUTPUT/predictions.csv (Azure's five fields, no header) and OUTPUT/{DETAILS_FILE} (every "
        "field, with a header). Images already in OUTPUT are not generated again. Exits 1 when some file or row "
        "was bad (each is listed; the rest is still processed).",
    )
    p.add_argument("input", help="A file or folder of input files.")
    p.add_argument("output", help="Output folder for the images and the two predictions files.")
    p.add_argument(
        "--parameters",
        help='Generation parameters as JSON, or @file.json, e.g. \'{"num_inference_steps": 30, "seed": 7}\' '
        "(added to SD_ENDPOINT_BATCH_PARAMETERS).",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    add_model_options(p)
    p.set_defaults(func=_cli)
