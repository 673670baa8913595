"""The HTTP server: ``sd-endpoint serve`` (FastAPI on uvicorn) with managed-online-endpoint behaviour.

Importing this package stays cheap (no FastAPI, no torch): ``sd-endpoint --help`` imports it to register
the ``serve`` subcommand. ``create_app`` and ``run_server`` load the server modules on first use.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from sd_endpoint.cli_options import add_model_options, settings_overrides

if TYPE_CHECKING:
    from collections.abc import Callable

    from fastapi import FastAPI

    from sd_endpoint.service import GenerationService
    from sd_endpoint.settings import Settings

__all__ = ["create_app", "register_cli", "run_server"]


def create_app(
    settings: Settings,
    service: GenerationService | None = None,
    *,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app; see ``sd_endpoint.server.app.create_app``."""
    from sd_endpoint.server.app import create_app as _create_app

    return _create_app(settings, service, on_fatal=on_fatal)


def run_server(settings: Settings) -> int:
    """Serve with uvicorn until SIGTERM/SIGINT; returns the exit code."""
    from sd_endpoint.server.app import run_server as _run_server

    return _run_server(settings)


def register_cli(subparsers: Any) -> None:
    """Add ``sd-endpoint serve``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="Serve the endpoint over HTTP (POST /score, GET /, /ready, /metrics, /swagger.json).",
        description="Serve the Azure ML scoring contract with FastAPI/uvicorn. Every SD_ENDPOINT_* setting "
        "applies; the options below override their variables.",
    )
    parser.add_argument("--host", help="Address to bind (SD_ENDPOINT_HOST, default 127.0.0.1).")
    parser.add_argument("--port", type=int, help="Port (SD_ENDPOINT_PORT, default 5001).")
    add_model_options(parser)
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from sd_endpoint.logs import setup_logging
    from sd_endpoint.settings import load_settings

    overrides = settings_overrides(args)
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    settings = load_settings(**overrides)
    setup_logging(settings.log_level, settings.log_format)
    return run_server(settings)
