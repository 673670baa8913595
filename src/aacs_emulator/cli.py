"""``aacs-emulator``: serve the emulator until SIGINT/SIGTERM, printing its CONTENT_SAFETY_ENDPOINT first."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from aacs_emulator.faults import FAULT_MODES, Fault
from aacs_emulator.limits import API_VERSION
from aacs_emulator.policy import DEFAULT_POLICY, Policy, PolicyError
from aacs_emulator.server import AacsEmulator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aacs-emulator",
        description=(
            "Serve a local Azure AI Content Safety look-alike (tests, offline use): POST "
            "/contentsafety/text:analyze and /contentsafety/image:analyze (api-version "
            f"{API_VERSION}) with verdicts from a JSON policy. Point the endpoint at it with "
            "CONTENT_SAFETY_ENDPOINT=http://HOST:PORT and the same CONTENT_SAFETY_KEY."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=5002, help="Port (default 5002; 0 picks a free one).")
    parser.add_argument(
        "--key",
        help="Accepted Ocp-Apim-Subscription-Key (default: $CONTENT_SAFETY_KEY; none set: no key is checked).",
    )
    parser.add_argument("--token", help="Accepted 'Authorization: Bearer <token>' value, for Entra ID clients.")
    parser.add_argument("--policy", type=Path, help="Policy JSON file (default: the built-in demo policy).")
    parser.add_argument("--print-policy", action="store_true", help="Print the built-in policy and exit.")
    parser.add_argument(
        "--fault",
        choices=FAULT_MODES,
        help="Fail every analyze call this way (also settable at run time with POST /emulator/faults).",
    )
    parser.add_argument("--fault-target", choices=["all", "text", "image"], default="all")
    parser.add_argument("--delay-s", type=float, default=5.0, help="Delay of the 'slow' fault (default 5).")
    parser.add_argument("--retry-after-s", type=int, default=1, help="Retry-After of the '429' fault (default 1).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when stopped by a signal, 2 for a bad policy or a port it cannot listen on."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.print_policy:
        sys.stdout.write(json.dumps(DEFAULT_POLICY, indent=2) + "\n")
        return 0
    try:
        policy = Policy.load(args.policy) if args.policy else Policy.default()
    except PolicyError as exc:
        sys.stderr.write(f"aacs-emulator: {exc}\n")
        return 2
    key = args.key if args.key is not None else os.environ.get("CONTENT_SAFETY_KEY") or None
    fault = Fault(args.fault, args.fault_target, args.delay_s, None, args.retry_after_s) if args.fault else None
    emulator = AacsEmulator(policy, key=key, token=args.token, host=args.host, port=args.port, fault=fault)
    try:
        emulator.start()
    except OSError as exc:
        sys.stderr.write(f"aacs-emulator: --port {args.port}: cannot listen on {args.host}:{args.port} ({exc})\n")
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sys.stdout.write(f"CONTENT_SAFETY_ENDPOINT={emulator.url}\n")
    sys.stdout.flush()
    try:
        done.wait()
    finally:
        emulator.stop()
    return 0
