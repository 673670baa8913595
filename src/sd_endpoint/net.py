"""Whether an address stays on this machine: the one check behind the server's no-key warning and the
screener's plain-HTTP bearer-token refusal."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (bracketed or not); a host name other than localhost counts as remote."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def is_loopback_url(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname or "")
