"""``GET /playground``: one self-contained page (static/playground.html) that drives ``POST /score``.

The page is plain HTML, CSS and JavaScript in one file, with no build step and nothing fetched from elsewhere
(its Content-Security-Policy allows only this server). What it needs to know about the server (defaults,
limits, schedulers, whether keys are set, whether input images are accepted) is written into it here.
It holds no secret: the key, when keys are set, is typed into the page and sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import json
import secrets
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from sd_endpoint import contract
from sd_endpoint.jobs import SCHEDULER_NAMES

if TYPE_CHECKING:
    from sd_endpoint.server.state import ServerState

PATH = "/playground"
_PLACEHOLDER = "/*CONFIG*/null"
_NONCE_PLACEHOLDER = "<script>"

router = APIRouter()


@lru_cache(maxsize=1)
def _template() -> str:
    text = resources.files("sd_endpoint.server").joinpath("static/playground.html").read_text(encoding="utf-8")
    assert _PLACEHOLDER in text and text.count(_NONCE_PLACEHOLDER) == 1
    return text


def page_config(state: ServerState) -> dict[str, Any]:
    """What the page shows as defaults and offers as choices; the server still validates every value."""
    settings = state.settings
    limits = state.service.limits if state.service is not None else None
    return {
        "defaults": {
            "steps": settings.default_steps,
            "guidance_scale": settings.default_guidance_scale,
            "width": limits.default_width if limits else settings.default_width or contract.Limits.default_width,
            "height": limits.default_height if limits else settings.default_height or contract.Limits.default_height,
            "scheduler": SCHEDULER_NAMES[0],
        },
        "limits": {"max_steps": settings.max_steps, "max_images": settings.max_images_per_request},
        "schedulers": list(SCHEDULER_NAMES),
        "keys": state.keys.enabled,
        # Image-to-image and inpainting: on once the contract takes the `image` column.
        "image_tasks": "image" in contract.COLUMNS,
    }


def render(config: dict[str, Any], nonce: str) -> str:
    data = json.dumps(config).replace("</", "<\\/")  # nothing in the data can close the script element
    return _template().replace(_PLACEHOLDER, data).replace(_NONCE_PLACEHOLDER, f'<script nonce="{nonce}">')


@router.get(PATH, response_class=HTMLResponse, summary="Playground page", operation_id="Playground")
async def playground(request: Request) -> Response:
    """A page to try the endpoint in a browser: it calls POST /score and shows the images."""
    state: ServerState = request.app.state.sd
    nonce = secrets.token_urlsafe(16)
    headers = {
        # Only this server: no CDN, no external fonts, nothing inline but the one script carrying this nonce.
        "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
        "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return HTMLResponse(render(page_config(state), nonce), headers=headers)
