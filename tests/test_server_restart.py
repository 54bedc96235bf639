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

import pytest

from sandbox.launcher import free_port

pytestmark = pytest.mark.server  # each test starts `imagegen server up` itself

ROOT = Path(__file__).parent.parent
HOLD = """
import sys, time
from flows.paying.slots import hold
with hold(sys.argv[1], 60):
    print("held", flush=True)
    time.sleep(3600)
"""
TAKE = """
import sys, time
from flows.paying.slots import hold
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


def test_limits_show_marks_slots_no_live_lease_holds(tmp_path: Path) -> None:
    """One limit's slot is held by a live process; another's is counted by the database with no
    lease at all (what a restart of a server with in-memory leases leaves). `imagegen limits
    show`, run beside `imagegen server up`'s state, tells them apart and names the fix."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate

    from deployments import server

    live, lost = "imagegen:test:show:jobs:live", "imagegen:test:show:jobs:lost"
    state = server.up(tmp_path / ".prefect-server", port=free_port(), database="sqlite")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_API_URL": state.api_url, "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_HOME": str(tmp_path / "client-home")}
    holder = None
    try:
        with SyncPrefectClient(api=state.api_url) as client:
            for name in (live, lost):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            client.update_global_concurrency_limit(lost, GlobalConcurrencyLimitUpdate(active_slots=1))
        holder = subprocess.Popen([sys.executable, "-c", HOLD, live], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True)
        assert holder.stdout.readline().strip() == "held"
        show = subprocess.run([str(Path(sys.executable).parent / "imagegen"), "limits", "show"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert show.returncode == 0, show.stderr[-2000:]
        lines = {name: [line for line in show.stdout.splitlines() if line.startswith(f"{name}:")]
                 for name in (live, lost)}
        assert lines[live] == [f"{live}: limit 1, active slots 1"], show.stdout
        assert lines[lost] == [f"{lost}: limit 1, active slots 1, 1 held by no live lease (free: imagegen limits reset {lost})"], \
            show.stdout
        assert "leases not readable" not in show.stdout
        reset = subprocess.run([str(Path(sys.executable).parent / "imagegen"), "limits", "reset", lost, "--yes"],
                               env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert f"{lost}: 1 slot(s) freed" in reset.stdout, reset.stdout + reset.stderr[-2000:]
    finally:
        if holder is not None:
            holder.kill()
        server.down(tmp_path / ".prefect-server")
