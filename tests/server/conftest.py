"""Fixtures for the in-process server tests (FakeBackend behind the real app, service and contract)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sd_endpoint.server import create_app
from sd_endpoint.service import GenerationService
from sd_endpoint.settings import Settings, load_settings
from tests.support.fakes import FakeBackend

KEYS = ("primary-key-0123456789", "secondary-key-9876543210")


def fake_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"device": "cpu", "dtype": "float32", "default_steps": 3}
    return load_settings(**{**base, **overrides})


def fake_app(backend: FakeBackend | None = None, **overrides: Any) -> tuple[FastAPI, FakeBackend]:
    backend = backend or FakeBackend()
    settings = fake_settings(**overrides)
    service = GenerationService(settings, backend)
    return create_app(settings, service, on_fatal=lambda: None), backend


def wait_ready(get: Callable[..., Any]) -> None:
    for _ in range(2000):
        if get("/ready").status_code == 200:
            return
        import time

        time.sleep(0.005)
    raise AssertionError("the app never became ready")


@pytest.fixture
def client() -> Iterator[TestClient]:
    """A ready app over FakeBackend, no keys."""
    app, _ = fake_app()
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


@pytest.fixture
def keyed_client() -> Iterator[TestClient]:
    app, _ = fake_app(keys=",".join(KEYS))
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan on this event loop, and an async client for concurrent requests."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as c:
            for _ in range(2000):
                if (await c.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.005)
            yield c
