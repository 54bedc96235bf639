"""The Prefect API away for a while at each moment of a paid step, on each provider, on real
processes: an `imagegen run` reaches a server of its own through a proxy on loopback
(`tests/netcut.py`); the run waits at a fault point (`IMAGEGEN_PAUSE_AT`,
`flows/paying/faults.py`), the proxy cuts every connection there and refuses new ones, the run
goes on without its API, and the proxy lets it through again AWAY_SECONDS later (shorter than a
lease, whatever the machine's load: longer outages are `test_fail_closed.py`'s). Each item
meets one moment. The run, and a rerun where it ends incomplete, finish the date with every
image charged once per the emulator's own count and no person needed: the rows "Prefect away
briefly" of the fault matrix's table."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pytest

from deployments import server
from sandbox.launcher import free_port
from tests.netcut import CuttableProxy
from tests.test_fail_closed import kill_server, register_on, run_env, wait_for
from tests.test_fault_matrix import doc_table
from tests.test_pay_once import (charges, emulators, ledger_states, once_each,  # noqa: F401 - a fixture
                                 spec_text, write_spec)

ROOT = Path(__file__).parent.parent
MOMENTS = ("slot", "sending", "answered", "generated", "archiving")
AWAY_SECONDS = 10  # the API is cut off this long at each moment
FAULT = "Prefect away briefly"


@pytest.mark.slow  # its own server, cut off five times
@pytest.mark.parametrize("provider", ["tams", "chuzhan", "tencent"])
def test_the_prefect_api_away_at_each_moment_costs_no_second_charge(emulators, tmp_path, provider) -> None:  # noqa: F811
    name, day = f"away-{provider}", date(2026, 8, 5)
    path = write_spec(tmp_path, spec_text(provider, name, len(MOMENTS), ", max_parallel: 1"), name)
    root, port = tmp_path / "server", free_port()
    state = server.up(root, port=port, database="sqlite")
    # Its UI asks this server's API, not Prefect's default :4200 (a page that could not load).
    assert httpx.get(f"{state.api_url.removesuffix('/api')}/ui-settings").json()["api_url"] == state.api_url
    proxy = CuttableProxy(port)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = {**run_env(f"{proxy.url}/api", tmp_path / "client-home"), "IMAGEGEN_PAUSE_DIR": str(pauses),
           "IMAGEGEN_PAUSE_AT": ",".join(f"{moment}:i{k}" for k, moment in enumerate(MOMENTS))}
    argv = [sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()]
    log, proc = tmp_path / "run.log", None
    try:
        register_on(state.api_url, emulators)
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for k, moment in enumerate(MOMENTS):
            marker = pauses / f"{moment}-i{k}"
            wait_for(f"i{k} at {moment}", marker.exists, 240, proc, log)
            proxy.cut()
            marker.unlink()
            time.sleep(AWAY_SECONDS)
            proxy.restore()
        reruns = 0
        while proc.wait(timeout=300) != 0 and reruns < 2:  # an item the outage failed is paid for on a rerun
            reruns += 1
            proc = subprocess.Popen(argv, env={**env, "IMAGEGEN_PAUSE_AT": ""}, cwd=ROOT,
                                    stdout=log.open("a"), stderr=subprocess.STDOUT)
        assert proc.returncode == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        proxy.close()
        kill_server(root)
    print(f"{provider}: complete after {reruns} rerun(s)")
    assert charges(emulators, provider, name) == once_each(name, len(MOMENTS))
    assert set(ledger_states(path, day).values()) == {"archived"}
    for moment in MOMENTS:
        assert doc_table()[(provider, moment, FAULT)] == "held"
