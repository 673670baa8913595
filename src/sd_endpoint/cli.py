"""``sd-endpoint``: serve, generate one image, call an endpoint, build the demo model, run a batch.

Subcommands owned by other modules register themselves through ``register_cli(subparsers)``, so the
options of each live next to the code they configure; every module imported here stays free of torch at
import time, which keeps ``--help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_endpoint.cli_options import add_model_options, settings_overrides
from sd_endpoint.errors import ConfigError, EndpointError, ModelLoadError

if TYPE_CHECKING:
    from sd_endpoint.jobs import CancelToken

_HTTP_TIMEOUT_S = 300.0

# Modules that add their own subcommand (module path -> what it adds).
_PLUGGED = (
    "sd_endpoint.server",  # serve
    "sd_endpoint.batch",  # batch
)


def _generate(args: argparse.Namespace) -> int:
    from sd_endpoint.service import GenerationService
    from sd_endpoint.settings import load_settings

    settings = load_settings(warmup=False, **settings_overrides(args))
    service = GenerationService.from_settings(settings)
    params = {
        k: v
        for k, v in {
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "negative_prompt": args.negative_prompt,
            "height": args.height,
            "width": args.width,
            "num_images_per_prompt": args.num_images,
            "seed": args.seed,
            "scheduler": args.scheduler,
            "output_format": args.format,
            "eta": args.eta,
        }.items()
        if v is not None
    }
    body = {"input_data": {"columns": ["prompt"], "data": [args.prompt]}, "parameters": params}
    started = time.perf_counter()
    result = service.handle(body, _local_deadline(args.timeout))
    out = Path(args.output)
    paths = _write_images(result.records, out.parent, single=out if len(result.records) == 1 else None)
    for path, record in zip(paths, result.records, strict=True):
        note = f"  ({'; '.join(record['warnings'])})" if record.get("warnings") else ""
        print(f"{path}  seed={record['seed']}{note}")
    print(f"{len(paths)} image(s) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _local_deadline(timeout_s: float | None) -> CancelToken:
    """A local command has no HTTP client waiting: no deadline (not SD_ENDPOINT_REQUEST_TIMEOUT_MS) unless asked."""
    from sd_endpoint.jobs import CancelToken

    return CancelToken.with_timeout_ms(None if timeout_s is None else timeout_s * 1000.0)


def _invoke(args: argparse.Namespace) -> int:
    body_text = Path(args.request_file).read_text(encoding="utf-8")
    if args.url:
        import httpx

        headers = {"Content-Type": "application/json"}
        if args.key:
            headers["Authorization"] = f"Bearer {args.key}"
        if args.deployment:
            headers["azureml-model-deployment"] = args.deployment
        timeout = _HTTP_TIMEOUT_S if args.timeout is None else args.timeout
        resp = httpx.post(args.url, content=body_text.encode(), headers=headers, timeout=timeout)
        if resp.status_code != 200:
            print(f"HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
            return 1
        records = resp.json()
        if isinstance(records, str):  # `az ml online-endpoint invoke`-style double-encoded body
            records = json.loads(records)
    else:
        from sd_endpoint.service import GenerationService
        from sd_endpoint.settings import load_settings

        service = GenerationService.from_settings(load_settings(warmup=False, **settings_overrides(args)))
        records = service.handle(body_text, _local_deadline(args.timeout)).records
    for path in _write_images(records, Path(args.out_dir)):
        print(path)
    return 0


def _slug(text: str, limit: int = 50) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "image"


def _write_images(records: list[dict[str, Any]], out_dir: Path, single: Path | None = None) -> list[Path]:
    import base64

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, record in enumerate(records):
        if not record.get("generated_image"):
            print(f"row {record.get('index')}: no image ({json.dumps(record.get('blocked'))})", file=sys.stderr)
            continue
        data = base64.b64decode(record["generated_image"])
        ext = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"RIFF": "webp"}
        suffix = next((v for k, v in ext.items() if data.startswith(k)), "png")
        path = single or out_dir / f"{i:02d}_{_slug(str(record.get('prompt', '')))}_seed{record.get('seed')}.{suffix}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _demo_model(args: argparse.Namespace) -> int:
    from sd_endpoint.model.demo import write_demo_model
    from sd_endpoint.settings import load_settings

    started = time.perf_counter()
    out = write_demo_model(Path(args.out_dir), full_size=args.full_size, cache_dir=load_settings().cache_dir)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"Wrote {'full-size' if args.full_size else 'tiny'} demo model to {out} ({size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-endpoint", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="Generate images locally and write them to files.")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="File (one image) or a name in the output folder.")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int, help="num_inference_steps (50).")
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-images", type=int, help="num_images_per_prompt.")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--scheduler")
    gen.add_argument("--format", choices=["png", "jpeg", "webp"])
    gen.add_argument("--eta", type=float)
    gen.add_argument("--timeout", type=float, help="Stop after this many seconds (error 408); no limit by default.")
    add_model_options(gen)
    gen.set_defaults(func=_generate)

    inv = sub.add_parser("invoke", help="Send a request file to an endpoint (or run it in-process) and save images.")
    inv.add_argument("--request-file", required=True)
    inv.add_argument("--url", help="Scoring URI, e.g. http://127.0.0.1:5001/score; in-process when omitted.")
    inv.add_argument("--key", help="Endpoint key, sent as 'Authorization: Bearer <key>'.")
    inv.add_argument("--deployment", help="Sent as the azureml-model-deployment header.")
    inv.add_argument("--out-dir", default="out")
    inv.add_argument(
        "--timeout",
        type=float,
        help=f"Seconds: the HTTP client's timeout with --url ({_HTTP_TIMEOUT_S:g} by default); in-process, stop "
        "generation after this long (error 408; no limit by default).",
    )
    add_model_options(inv)
    inv.set_defaults(func=_invoke)

    demo = sub.add_parser("demo-model", help="Write the demo model (random weights, SD 2.1 architecture).")
    demo.add_argument("out_dir")
    demo.add_argument("--full-size", action="store_true", help="The real 865.9M-parameter UNet (fp16, 2.6 GB).")
    demo.set_defaults(func=_demo_model)

    for name in _PLUGGED:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sd_endpoint.cpu_policy import prefer_passive_waits
    from sd_endpoint.logs import setup_logging

    prefer_passive_waits()  # before any subcommand imports torch

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        code: int = args.func(args)
        return code
    except (ConfigError, ModelLoadError) as exc:
        logging.getLogger("sd_endpoint").error("%s", exc)
        return 2
    except EndpointError as exc:
        print(f"error ({exc.status_code}): {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
