"""`imagegen server up`: a Prefect server whose limits survive its own restart. A job slot is
held by a process that dies while the server restarts; with the server's leases on disk the
slot is freed when its lease expires, so the next job gets it within one lease period (with
Prefect's default in-memory leases it would stay held for good)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sandbox.launcher import free_port

ROOT = Path(__file__).parent.parent
HOLD = """
import sys, time
from flows.slots import hold
with hold(sys.argv[1], 60):
    print("held", flush=True)
    time.sleep(3600)
"""
TAKE = """
import sys, time
from flows.slots import hold
started = time.monotonic()
with hold(sys.argv[1], 60):
    print(f"took {time.monotonic() - started:.1f}", flush=True)
"""
LEASE, REPOSSESSOR_EVERY = 60, 15  # the job-slot lease; how often the server frees expired leases


def test_a_slot_held_across_a_server_restart_is_freed_within_one_lease(tmp_path: Path) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from deployments import server

    root, port, name = tmp_path / "server", free_port(), "imagegen:test:restart:jobs"
    state = server.up(root, port=port, database="sqlite")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_API_URL": state.api_url, "PREFECT_LOGGING_LEVEL": "WARNING"}
    holder = None
    try:
        with SyncPrefectClient(api=state.api_url) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        holder = subprocess.Popen([sys.executable, "-c", HOLD, name], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True)
        assert holder.stdout.readline().strip() == "held"
        # The server stops while the slot is held, and its holder dies meanwhile.
        assert server.down(root)
        holder.kill()
        holder.wait()
        restarted = server.up(root, port=port)
        assert restarted.pid != state.pid
        with SyncPrefectClient(api=restarted.api_url) as client:
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 1  # still counted
        started = time.monotonic()
        took = subprocess.run([sys.executable, "-c", TAKE, name], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=LEASE + REPOSSESSOR_EVERY + 120)
        waited = time.monotonic() - started
        assert took.returncode == 0 and took.stdout.startswith("took"), took.stdout + took.stderr[-2000:]
        print(f"the next job got the slot {waited:.0f} s after the restart (lease {LEASE} s)")
        assert waited <= LEASE + REPOSSESSOR_EVERY + 10
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        server.down(root)
