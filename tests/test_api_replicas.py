"""Two Prefect API replicas behind one PostgreSQL database, with Redis for messaging, the
events' causal ordering, the concurrency leases and the background services' docket, and the
services in a process of their own: the README's replica settings, as Prefect documents them
for a scaled self-hosted server. Runs on both replicas at once share the provider limits: the
emulators see no limit crossed and every image charged once."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from deployments import postgres
from deployments.server import replica_env
from sandbox.launcher import free_port
from tests.conftest import assert_within_limits, refusals
from tests.servers import BIN, cli, start, stop, wait_healthy
from tests.test_pay_once import charges, spec_text

REDIS = shutil.which("redis-server")
pytestmark = [
    pytest.mark.skipif(postgres.binaries() is None, reason="Debian's postgresql is not installed"),
    pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed (apt-get install redis-server)"),
]
PROVIDERS = ("tams", "tencent")


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def replicas(sandbox_blocks, tmp_path_factory):
    """Yields the two replicas' API URLs."""
    tmp = tmp_path_factory.mktemp("replicas")
    root = Path(tempfile.mkdtemp(prefix="imagegen-replicas-"))  # PostgreSQL's user must reach it
    root.chmod(0o755)
    cluster = postgres.Cluster(root / "postgres")
    procs: list[subprocess.Popen] = []
    try:
        database = cluster.start()
        redis_port = free_port()
        procs.append(start([REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                            "no"], dict(os.environ), tmp / "redis.log"))
        wait_port(redis_port)
        env = replica_env(database, f"redis://127.0.0.1:{redis_port}", tmp / "home")
        cli(env, str(BIN / "prefect"), "server", "database", "upgrade", "-y")
        urls = []
        for n in (1, 2):
            port = free_port()
            log = tmp / f"api-{n}.log"
            procs.append(start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                "--no-services"], env, log))
            urls.append(f"http://127.0.0.1:{port}/api")
            wait_healthy(urls[-1], procs[-1], log)
        procs.append(start([str(BIN / "prefect"), "server", "services", "start"], env, tmp / "services.log"))
        yield urls
    finally:
        for proc in reversed(procs):
            stop(proc)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def client_env(url: str, home: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "PREFECT_API_URL": url,
            "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING",
            "IMAGEGEN_RECLAIM_LEASES": "0"}  # the servers' own repossessor frees expired leases


def test_a_slot_taken_through_one_replica_is_released_through_the_other(replicas) -> None:
    """Behind a load balancer a holder's calls land on any replica. Its lease lives in Redis,
    so the other replica renews and releases it (with each replica's leases in memory, the
    release would find no lease and leave the slot held for good)."""
    first, second = replicas
    name = "imagegen:test:replicas:jobs"
    assert httpx.post(f"{first}/v2/concurrency_limits/", json={"name": name, "limit": 1}).status_code == 201
    lease = httpx.post(f"{first}/v2/concurrency_limits/increment-with-lease",
                       json={"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": 60}).json()["lease_id"]
    assert httpx.post(f"{second}/v2/concurrency_limits/leases/{lease}/renew", json={"lease_duration": 60}).status_code == 204
    assert httpx.post(f"{second}/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease}).status_code == 204
    assert httpx.get(f"{first}/v2/concurrency_limits/{name}").json()["active_slots"] == 0


def test_runs_on_two_api_replicas_share_the_provider_limits(replicas, sandbox_blocks, tmp_path) -> None:
    cli(client_env(replicas[0], tmp_path / "register-home"), str(BIN / "imagegen"), "sandbox", "register",
        "--state-dir", sandbox_blocks.state_dir)
    before = refusals(sandbox_blocks)
    runs, started = [], time.monotonic()
    for provider in PROVIDERS:  # one provider at a time, one run through each replica at once
        pair = []
        for n, url in enumerate(replicas):
            name = f"replica-{provider}-{n}"
            path = tmp_path / f"{name}.yaml"
            path.write_text(spec_text(provider, name, 3))
            pair.append((provider, name, url, subprocess.Popen(
                [str(BIN / "imagegen"), "run", str(path), "--run-date", "2026-11-01"],
                env=client_env(url, tmp_path / f"home-{name}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)))
        for _, name, url, proc in pair:
            out = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, f"{name} via {url}: {out[-3000:]}"
        runs += pair
    print(f"2 x 2 runs (TAMS, then Tencent, 3 images each, one through each replica) took "
          f"{time.monotonic() - started:.0f} s")
    # Tencent's one text job in flight and both rates, across the replicas. Limits each replica
    # kept apart would let twice the rate and two Tencent jobs through: dozens of refusals here.
    assert_within_limits(sandbox_blocks, before)
    for provider, name, _, _ in runs:
        assert charges(sandbox_blocks, provider, name) == {f"item {k} of {name}": 1 for k in range(3)}
