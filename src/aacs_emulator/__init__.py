"""A local server that answers like Azure AI Content Safety (API 2023-10-01), for tests and offline use.

A development tool: it is not part of the ``sd_endpoint`` package or its wheel.

``aacs-emulator --port 5002 --key dev-key`` (or ``python -m aacs_emulator``) serves:

* ``POST /contentsafety/text:analyze?api-version=2023-10-01`` and
  ``POST /contentsafety/image:analyze?api-version=2023-10-01`` with the service's request and response
  JSON (camelCase, ``categoriesAnalysis``, ``blocklistsMatch``, ``outputType``), its limits (text up to
  10,000 characters; images up to 4 MB and 2048x2048, at least 50x50), its authentication
  (``Ocp-Apim-Subscription-Key``, or ``Authorization: Bearer <token>`` for a configured token) and its
  error body ``{"error": {"code": ..., "message": ...}}``.
* Verdicts from a deterministic policy (``Policy``; JSON, see ``DEFAULT_POLICY`` and the README).
* Fault injection for failure tests: ``down`` (drop the connection), ``slow`` (answer late), ``500``,
  ``503``, ``429``, ``401``, ``403``; from the command line, from ``POST /emulator/faults``, or from Python.
* ``GET /emulator/requests``: what was asked (sizes and hashes, never the key).

In tests, ``with AacsEmulator(policy, key="k") as emu:`` serves on 127.0.0.1 on a free port; ``emu.url``
is the value for ``CONTENT_SAFETY_ENDPOINT`` and ``emu.requests`` records every analyze call.
"""

from aacs_emulator.api import RecordedRequest
from aacs_emulator.faults import FAULT_MODES, Fault, FaultMode, FaultTarget
from aacs_emulator.policy import DEFAULT_POLICY, Policy, PolicyError, image_fingerprint
from aacs_emulator.server import AacsEmulator

__all__ = [
    "DEFAULT_POLICY",
    "FAULT_MODES",
    "AacsEmulator",
    "Fault",
    "FaultMode",
    "FaultTarget",
    "Policy",
    "PolicyError",
    "RecordedRequest",
    "image_fingerprint",
]
