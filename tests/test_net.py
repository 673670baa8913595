"""The one loopback check: the server's no-key warning and the screener's plain-HTTP token refusal use it."""

from __future__ import annotations

import pytest

from sd_endpoint.net import is_loopback, is_loopback_url


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", " LocalHost "])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.com", "localhost.example.com", ""])
def test_other_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_urls() -> None:
    assert is_loopback_url("http://127.0.0.1:5002") and is_loopback_url("http://[::1]:8080/x")
    assert is_loopback_url("http://localhost")
    assert not is_loopback_url("http://my-resource.cognitiveservices.azure.com") and not is_loopback_url("nonsense")
