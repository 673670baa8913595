"""Prometheus metrics, in one place. Served at ``GET /metrics`` by the HTTP server.

The objects live in their own registry so that tests and several apps in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

REQUESTS = Counter(
    "sd_requests_total", "HTTP requests by route and status code.", ["route", "status"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "sd_request_seconds", "Total request latency.", ["route"], buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
QUEUE_SECONDS = Histogram(
    "sd_queue_wait_seconds",
    "Time a request waited for a generation slot.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
GENERATION_SECONDS = Histogram(
    "sd_generation_seconds", "Time of one pipeline call (a batch).", buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
ENCODE_SECONDS = Histogram(
    "sd_encode_seconds", "Time to encode a request's images.", buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
SCREENING_SECONDS = Histogram(
    "sd_content_safety_seconds",
    "Content screening time per request and stage.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("sd_requests_in_flight", "Requests being generated now.", registry=REGISTRY)
QUEUED = Gauge("sd_requests_queued", "Requests waiting for a generation slot.", registry=REGISTRY)
BATCH_SIZE = Histogram(
    "sd_batch_size_images", "Images per pipeline call.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=REGISTRY
)
BATCH_REQUESTS = Histogram(
    "sd_batch_size_requests",
    "Requests merged into one pipeline call.",
    buckets=(1, 2, 3, 4, 6, 8, 16),
    registry=REGISTRY,
)
IMAGES = Counter("sd_images_generated_total", "Images generated.", registry=REGISTRY)
STEPS = Counter("sd_denoising_steps_total", "Denoising steps run (per pipeline call).", registry=REGISTRY)
STEPS_PER_SECOND = Gauge(
    "sd_denoising_steps_per_second", "Denoising steps per second of the last pipeline call.", registry=REGISTRY
)
CANCELLED = Counter(
    "sd_generations_stopped_total", "Generations stopped early, by reason.", ["reason"], registry=REGISTRY
)
WORKER_ERRORS = Counter(
    "sd_worker_errors_total",
    "Failures inside the generation worker's own bookkeeping; the call's requests failed, the worker went on.",
    registry=REGISTRY,
)
WORKER_DEATHS = Counter(
    "sd_worker_deaths_total", "Times the generation worker thread ended unexpectedly.", registry=REGISTRY
)
MODEL_LOAD_SECONDS = Gauge("sd_model_load_seconds", "Time to load the model.", registry=REGISTRY)
READY = Gauge("sd_ready", "1 once the model is loaded and warmed up.", registry=REGISTRY)
BACKEND = Info("sd_backend", "The backend chosen at start-up and why.", registry=REGISTRY)
BLOCKED = Counter(
    "sd_content_blocked_total",
    "Prompts and images blocked by content screening.",
    ["stage", "category"],
    registry=REGISTRY,
)
SCREENING_SKIPPED = Counter(
    "sd_content_safety_skipped_total",
    "Requests answered unscreened because screening failed (fail-open).",
    registry=REGISTRY,
)
SCREENING_CALLS = Counter(
    "sd_content_safety_calls_total",
    "Calls to Azure AI Content Safety by kind (text, image) and outcome (ok or the failure class).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
SCREENING_CALL_SECONDS = Histogram(
    "sd_content_safety_call_seconds",
    "Latency of one Content Safety call, retries included.",
    ["kind"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
SCREENING_IMAGES_ADAPTED = Counter(
    "sd_content_safety_images_adapted_total",
    "Images resized or re-encoded for screening because they were outside the service's limits.",
    registry=REGISTRY,
)
