"""The playground page in-process: what the server writes into it, and the headers that keep it self-contained.

What the page does in a browser is tested in test_playground_browser.py (real Chromium, real server).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.testclient import TestClient

from tests.server.conftest import KEYS, fake_app, wait_ready


def config_of(html: str) -> dict[str, Any]:
    found = re.search(r"const CONFIG = (\{.*?\});\n", html)
    assert found, "the page carries no CONFIG"
    config: dict[str, Any] = json.loads(found.group(1))
    return config


def test_the_page_carries_the_servers_defaults_and_choices(client: TestClient) -> None:
    resp = client.get("/playground")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    config = config_of(resp.text)
    assert config["defaults"] == {"steps": 3, "guidance_scale": 7.5, "width": 64, "height": 64, "scheduler": "ddim"}
    assert config["limits"] == {"max_steps": 150, "max_images": 8}
    assert "euler" in config["schedulers"] and config["keys"] is False
    from sd_endpoint.contract import COLUMNS

    assert config["image_tasks"] is ("image" in COLUMNS)


def test_the_key_field_is_offered_when_keys_are_set_and_the_page_needs_none() -> None:
    app, _ = fake_app(keys=",".join(KEYS), default_steps=7, max_steps=40)
    with TestClient(app) as c:
        wait_ready(c.get)
        resp = c.get("/playground")  # no Authorization: the page holds no secret
        assert resp.status_code == 200
        config = config_of(resp.text)
        assert config["keys"] is True and config["defaults"]["steps"] == 7 and config["limits"]["max_steps"] == 40
        assert not any(key in resp.text for key in KEYS)


def test_only_the_nonced_script_runs_and_nothing_comes_from_elsewhere(client: TestClient) -> None:
    first, second = client.get("/playground"), client.get("/playground")
    csp = first.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'<script nonce="{nonce.group(1)}">' in first.text
    assert first.text.count("<script") == 1
    assert nonce.group(1) not in second.headers["content-security-policy"]  # a fresh nonce per response
    for directive in ("default-src 'none'", "connect-src 'self'", "img-src data: blob:", "frame-ancestors 'none'"):
        assert directive in csp
    assert first.headers["x-content-type-options"] == "nosniff"


def test_other_methods_get_405_with_allow(client: TestClient) -> None:
    resp = client.post("/playground")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
