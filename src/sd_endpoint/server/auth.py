"""Key authentication, as a managed online endpoint with ``auth_mode: key`` does it.

``SD_ENDPOINT_KEYS`` holds a primary and a secondary key (any number, comma-separated) so that keys can be
rotated without downtime: deploy with ``new,old``, move the clients, then drop ``old``. A request is
accepted when its ``Authorization: Bearer <key>`` matches any of them; every key is compared in constant
time, and keys never reach a log line or an error message.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Request
from pydantic import SecretStr

from sd_endpoint.errors import Unauthorized


class KeyCheck:
    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._keys = [k.get_secret_value().encode("utf-8") for k in keys if k.get_secret_value()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether the header would pass ``check`` (always, when no key is configured)."""
        try:
            self.check(authorization)
        except Unauthorized:
            return False
        return True

    def check(self, authorization: str | None) -> None:
        """Raise Unauthorized (401 + WWW-Authenticate) unless the header carries a configured key."""
        if not self._keys:
            return
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        presented = credentials.strip().encode("utf-8")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized()
        matched = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise Unauthorized(
                "Invalid key: send 'Authorization: Bearer <key>' with the endpoint's primary or secondary key."
            )


def require_key(request: Request) -> None:
    """FastAPI dependency of the key-protected routes (the app's ``KeyCheck`` is on ``app.state.sd.keys``)."""
    keys: KeyCheck = request.app.state.sd.keys
    keys.check(request.headers.get("authorization"))
