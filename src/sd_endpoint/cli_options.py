"""Command-line options shared by every subcommand that loads the model (generate, invoke, serve, batch).

Its own module so that subcommands living next to the code they run (``server``, ``batch``) import these
options without importing ``sd_endpoint.cli``, which imports them to register their subcommands.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that override model settings."""
    parser.add_argument("--model", help="Diffusers folder, .safetensors/.ckpt, Hub id, or 'demo' (SD_ENDPOINT_MODEL).")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (SD_ENDPOINT_DEVICE).")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="(SD_ENDPOINT_DTYPE).")
    parser.add_argument("--backend", choices=["auto", "diffusers", "deepspeed"], help="(SD_ENDPOINT_BACKEND).")


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model settings given on the command line, as keyword overrides for ``load_settings``."""
    return {k: getattr(args, k) for k in ("model", "device", "dtype", "backend") if getattr(args, k, None)}
