"""The sandbox's ports: another process that binds a port the sandbox chose, between the choice
and its server's bind (as the parallel test workers and their Prefect servers do), must not give
a sandbox whose "S3" is someone else's server. The other process is real (an HTTP server that
answers 400 to everything, as the one that failed a CI run did); the moment it starts is the
fault point: just before SeaweedFS is spawned."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from sandbox import launcher


class Refuses(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(400)
        self.end_headers()

    do_PUT = do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


def bound_first(monkeypatch: pytest.MonkeyPatch, port_of: Callable[[list[str]], int | None],
                handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[list[int]]:
    """Before the first process whose command `port_of` gives a port is spawned, another HTTP
    server (answering with `handler`) binds that port; yields the ports so taken."""
    real_spawn, servers, taken = launcher.spawn, [], []

    def spawn(cmd: list[str], log: Path, **options: object):
        if not servers and (port := port_of(cmd)) is not None:
            servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), handler))
            threading.Thread(target=servers[0].serve_forever, daemon=True).start()
            taken.append(port)
        return real_spawn(cmd, log, **options)

    monkeypatch.setattr(launcher, "spawn", spawn)
    yield taken
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def s3_port_taken_first(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Before the first SeaweedFS starts, another HTTP server binds the port it was given."""
    def port_of(cmd: list[str]) -> int | None:
        return int(next(arg for arg in cmd if arg.startswith("-s3.port=")).split("=")[1]) if "mini" in cmd else None

    yield from bound_first(monkeypatch, port_of, Refuses)


def test_free_ports_are_distinct_and_avoid_the_taken_ones() -> None:
    first = launcher.free_ports(20)
    assert len(set(first)) == 20
    assert not set(launcher.free_ports(20, frozenset(first))) & set(first)


def test_a_port_taken_before_the_s3_server_binds_it_is_named_not_mistaken_for_s3(
        tmp_path: Path, s3_port_taken_first: list[int]) -> None:
    port = launcher.free_port()
    with pytest.raises(launcher.PortTaken, match=f"port {port} for the s3 sandbox was taken while it started, by pid"):
        launcher.up(tmp_path, ports={"tams": launcher.free_port()}, s3_port=port, latency=0.1, buckets=("b",),
                    providers=["tams"])
    assert s3_port_taken_first == [port]
    assert not launcher.SandboxState.load(tmp_path).pids  # what it started, it stopped


def test_the_sandbox_on_free_ports_moves_to_other_ports_and_its_bucket_exists(
        tmp_path: Path, s3_port_taken_first: list[int]) -> None:
    state = launcher.up_on_free_ports(tmp_path, latency=0.1, buckets=("moved",), providers=["tams"])
    try:
        assert s3_port_taken_first and state.s3_url != f"http://127.0.0.1:{s3_port_taken_first[0]}"
        client = boto3.client("s3", endpoint_url=state.s3_url, aws_access_key_id=state.s3_access_key,
                              aws_secret_access_key=state.s3_secret_key, region_name="us-east-1",
                              config=Config(signature_version="s3v4"))
        client.head_bucket(Bucket="moved")
    finally:
        launcher.down(tmp_path)


class AnswersAll(http.server.BaseHTTPRequestHandler):
    """What a Prefect server's UI does: 200 and a page, for any path."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def emulator_port_taken_first(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Before the first emulator starts, another HTTP server that answers 200 to everything binds
    the port it was given (a CI run's 触站AI "emulator" was a Prefect server's UI: HTTP 404 for
    /v1/draw in every later test of that worker)."""
    def port_of(cmd: list[str]) -> int | None:
        return int(cmd[cmd.index("--port") + 1]) if "sandbox.serve" in cmd else None

    yield from bound_first(monkeypatch, port_of, AnswersAll)


def test_an_emulator_port_taken_by_a_server_answering_everything_is_chosen_again(
        tmp_path: Path, emulator_port_taken_first: list[int]) -> None:
    import httpx

    state = launcher.up_on_free_ports(tmp_path, latency=0.1, buckets=("moved",), providers=["chuzhan"])
    try:
        assert emulator_port_taken_first and state.url("chuzhan") != f"http://127.0.0.1:{emulator_port_taken_first[0]}"
        assert httpx.get(f"{state.url('chuzhan')}/_sandbox/health").json()["pid"] == state.pids["chuzhan"]
    finally:
        launcher.down(tmp_path)


def test_a_port_holder_is_named_though_a_file_it_had_open_closed_meanwhile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`port_holder` names the process listening on a port even when one of its files closes
    between the listing of its files and the look at that file (a busy Prefect server or test
    worker opens and closes files all the time: a CI run got "another process" for this very
    test worker). The fault point: the first file of every process is gone when looked at."""
    import os
    import socket

    real_readlink, passed = os.readlink, set()

    def readlink(path: object) -> str:
        process = Path(str(path)).parent.parent
        if process not in passed:
            passed.add(process)
            raise FileNotFoundError(path)
        return real_readlink(path)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    monkeypatch.setattr(launcher.os, "readlink", readlink)
    try:
        name = launcher.port_holder(listener.getsockname()[1])
    finally:
        listener.close()
    assert name.startswith(f"pid {os.getpid()} "), name
