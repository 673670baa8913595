"""``python -m sd_endpoint.batch --worker``: the batch worker process (see ``sd_endpoint.batch.worker``)."""

from __future__ import annotations

import sys

if "--worker" in sys.argv[1:]:
    from sd_endpoint.cpu_policy import prefer_passive_waits

    prefer_passive_waits()  # before the runner imports torch
    from sd_endpoint.batch.worker import worker_main

    sys.exit(worker_main())
sys.stderr.write("usage: python -m sd_endpoint.batch --worker   (or: sd-endpoint batch INPUT OUTPUT)\n")
sys.exit(2)
