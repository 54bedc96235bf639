"""Expiring result URLs, as object storage presigns them: an HMAC over the path and the expiry."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping


class SignedUrls:
    """Sign a path for `ttl` seconds; check a request for it. Parameter names are per provider."""

    def __init__(self, ttl: int, expires_param: str = "expires", signature_param: str = "sig") -> None:
        self.ttl, self.expires_param, self.signature_param = ttl, expires_param, signature_param
        self._secret = secrets.token_bytes(32)

    def _signature(self, path: str, expires: str) -> str:
        return hmac.new(self._secret, f"{path}|{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, base: str, path: str) -> tuple[str, str]:
        """The full URL of `path` under `base`, and its expiry (Unix seconds, as text)."""
        expires = str(int(time.time()) + self.ttl)
        query = f"{self.expires_param}={expires}&{self.signature_param}={self._signature(path, expires)}"
        return f"{base.rstrip('/')}{path}?{query}", expires

    def check(self, path: str, params: Mapping[str, str]) -> str | None:
        """None when the request is valid; "signature" or "expired" when it is not."""
        expires = params.get(self.expires_param, "0")
        if not expires.isdigit() or not hmac.compare_digest(params.get(self.signature_param, ""),
                                                            self._signature(path, expires)):
            return "signature"
        return "expired" if int(expires) < time.time() else None
