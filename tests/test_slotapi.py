"""The direct path of slot calls (`flows.paying.slotapi`) against a loopback HTTP server that
answers as told: what it reads itself, and what it leaves to Prefect's client."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import pytest

from blocks.base import retry_after_seconds
from flows.paying import slotapi

PATH = "/v2/concurrency_limits/increment"


class Api(ThreadingHTTPServer):
    """Answers each POST with the next (status, headers, body) of `answers`; keeps what came."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        self.seen: list[tuple[str, dict[str, str], dict]] = []


class Handler(BaseHTTPRequestHandler):
    server: Api

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        status, headers, content = self.server.answers.pop(0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    for name in [name for name in os.environ if name.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("IMAGEGEN_DIRECT_SLOTS", raising=False)
    monkeypatch.setattr(slotapi, "_path", slotapi._Path())
    server = Api()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def prefect_client(api: Api, scheme: str = "http") -> SimpleNamespace:
    """What the direct path reads of Prefect's client: its base URL and its headers."""
    headers = httpx.Headers({"authorization": "Bearer key", "x-prefect-api-version": "0.8.4",
                             "accept-encoding": "gzip", "x-custom": "1"})
    inner = SimpleNamespace(base_url=f"{scheme}://127.0.0.1:{api.server_address[1]}/api/", headers=headers)
    return SimpleNamespace(_client=inner)


def test_a_grant_goes_direct_with_prefects_headers(api: Api) -> None:
    api.answers.append((200, {"content-type": "application/json"}, b'[{"name": "x"}]'))
    answer = slotapi.post(prefect_client(api), PATH, {"names": ["x"], "slots": 1, "mode": "rate_limit"})
    assert answer is not None and answer.json() == [{"name": "x"}]
    path, headers, body = api.seen[0]
    assert path == "/api" + PATH and body == {"names": ["x"], "slots": 1, "mode": "rate_limit"}
    assert headers["authorization"] == "Bearer key" and headers["x-custom"] == "1"
    assert "gzip" not in headers.get("accept-encoding", "")


def test_a_full_limit_is_refused_as_prefects_client_refuses_it(api: Api) -> None:
    api.answers.append((423, {"Retry-After": "1.5"}, b'{"detail": "locked"}'))
    with pytest.raises(httpx.HTTPStatusError) as refused:
        slotapi.post(prefect_client(api), PATH, {})
    assert refused.value.response.status_code == 423
    assert retry_after_seconds(refused.value.response) == 1.5  # read as the callers read it


def test_a_release_answer_without_a_body_is_read(api: Api) -> None:
    api.answers.append((204, {}, b""))
    answer = slotapi.post(prefect_client(api), "/v2/concurrency_limits/decrement-with-lease", {"lease_id": "x"})
    assert answer is not None and answer.status_code == 204


@pytest.mark.parametrize("status", [401, 403, 404])
def test_an_answer_it_does_not_read_leaves_the_process_to_prefects_client(api: Api, status: int) -> None:
    api.answers.append((status, {}, b'{"detail": "no"}'))
    client = prefect_client(api)
    assert slotapi.post(client, PATH, {}) is None
    assert slotapi.post(client, PATH, {}) is None  # from now on, without asking
    assert len(api.seen) == 1 and slotapi._path.off == f"HTTP {status} on {PATH}"


@pytest.mark.parametrize("status", [429, 503])
def test_a_passing_fault_leaves_only_that_call_to_prefects_client(api: Api, status: int) -> None:
    api.answers += [(status, {}, b"{}"), (200, {}, b"[]")]
    client = prefect_client(api)
    assert slotapi.post(client, PATH, {}) is None
    assert slotapi.post(client, PATH, {}).json() == []
    assert slotapi._path.off is None


def test_a_connection_that_fails_leaves_that_call_to_prefects_client(api: Api) -> None:
    client = prefect_client(api)
    api.shutdown()
    api.server_close()
    assert slotapi.post(client, PATH, {}) is None
    assert slotapi._path.off is None


@pytest.mark.parametrize("why", ["https", "proxy", "switch"])
def test_not_used_where_prefects_client_decides_more(api: Api, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    if why == "proxy":
        monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    if why == "switch":
        monkeypatch.setenv("IMAGEGEN_DIRECT_SLOTS", "0")
    assert slotapi.post(prefect_client(api, "https" if why == "https" else "http"), PATH, {}) is None
    assert api.seen == [] and slotapi._path.off
