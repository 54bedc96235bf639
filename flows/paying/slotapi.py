"""The slot calls every item makes (a rate slot, a held slot, its release), sent directly.

Through Prefect's sync client one such call cost 1.1-1.7 ms of the calling thread's CPU (httpx,
its retry wrapper, its hooks), five or six an item. Here the same POST, with the same JSON and
the headers Prefect's client would send (its API version, authorisation and custom headers,
read from that client), goes on a pooled connection: 0.5-0.8 ms. A fast path only, never a
second client:

- it answers only what it can tell for sure: granted or released (200, 204), read as Prefect's
  client's response is read (`Answer`), and full (423, with its Retry-After), raised as the
  `httpx.HTTPStatusError` Prefect's client raises (`Full`);
- any other answer makes `post` return None and the call goes through Prefect's client, with
  its retries and error types; after a refusal other than 429 (authorisation, a CSRF token
  asked for, a path unknown) the process takes Prefect's client from then on;
- a connection that fails also returns None for that call (Prefect's client retries it as it
  would have), without switching the path off;
- it is not used for an `https` API (its certificates are Prefect's client's to check), with a
  proxy in the environment, or with `IMAGEGEN_DIRECT_SLOTS=0`.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
import urllib.request
from typing import Any

import httpx

DROPPED_HEADERS = frozenset({"accept-encoding", "connection", "content-length", "host"})


class _Path:
    """Where the direct calls go and with which headers, or `off` (why not)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready = False
        self.off: str | None = None
        self.prefix = ""  # the API's path, e.g. /api
        self.headers: dict[str, str] = {}
        self.pool: Any = None
        self.timeout: Any = None
        self.sent = 0  # calls answered directly (for tests)


_path = _Path()


def _set_up(client: Any) -> None:
    """Read the API's URL, headers and timeout from Prefect's `client` (once per process)."""
    import urllib3
    from prefect.settings import get_current_settings

    inner = getattr(client, "_client", None)
    url = str(getattr(inner, "base_url", "") or "")
    parts = urllib.parse.urlsplit(url)
    if os.environ.get("IMAGEGEN_DIRECT_SLOTS", "").strip() == "0":
        _path.off = "IMAGEGEN_DIRECT_SLOTS=0"
    elif parts.scheme != "http" or not parts.hostname or inner is None:
        _path.off = f"API at {parts.scheme or 'no'} URL"
    elif urllib.request.getproxies():  # as `flows.s3direct` decides it: httpx honours them, this path does not
        _path.off = "a proxy in the environment"
    else:
        _path.prefix = parts.path.rstrip("/")
        _path.headers = {k: v for k, v in inner.headers.items() if k.lower() not in DROPPED_HEADERS}
        _path.headers["content-type"] = "application/json"
        seconds = float(get_current_settings().api.request_timeout)
        _path.timeout = urllib3.Timeout(connect=min(10.0, seconds), read=seconds)
        _path.pool = urllib3.HTTPConnectionPool(parts.hostname, parts.port or 80, maxsize=256, retries=False)
    _path.ready = True


def switch_off(why: str) -> None:
    """Take Prefect's client for every slot call of this process from now on."""
    with _path.lock:
        _path.off = why
        _path.ready = True


class Answer:
    """An answer read as Prefect's client's response is read (`status_code`, `headers`, `json()`)."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: Any, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # case-insensitive, as httpx's
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class Full(httpx.HTTPStatusError):
    """423: the limit is full (`response.headers` has the Retry-After), as Prefect's client raises it."""

    def __init__(self, path: str, answer: Answer) -> None:
        Exception.__init__(self, f"423 Locked for {path}")
        self.request = None  # type: ignore[assignment] - not made: nothing reads it
        self.response = answer  # type: ignore[assignment]


def post(client: Any, path: str, body: dict[str, Any]) -> Answer | None:
    """POST `body` to the API's `path` (e.g. `/v2/concurrency_limits/increment`). Returns the
    200 or 204 answer; raises `httpx.HTTPStatusError` for a 423 (full), as Prefect's client does;
    None when the call is to go through Prefect's `client` instead."""
    if not _path.ready:
        with _path.lock:
            if not _path.ready:
                _set_up(client)
    if _path.off is not None:
        return None
    try:
        answer = _path.pool.urlopen("POST", _path.prefix + path, body=json.dumps(body).encode(),
                                    headers=_path.headers, redirect=False, timeout=_path.timeout)
    except Exception:  # noqa: BLE001 - the connection failed: Prefect's client makes (and retries) the call
        return None
    if answer.status not in (200, 204, 423):
        if answer.status < 500 and answer.status != 429:  # not a passing fault: an answer this path does not read
            switch_off(f"HTTP {answer.status} on {path}")
        return None
    _path.sent += 1
    found = Answer(answer.status, answer.headers, answer.data)
    if answer.status == 423:
        raise Full(path, found)
    return found
