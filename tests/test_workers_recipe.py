"""The multi-worker recipe of the README, run as written: one `imagegen server up` on
PostgreSQL, three process workers started in a directory of their own (as on three machines),
the deployments from `prefect deploy --all`, backfills of several dates on all three providers
spread over the three workers. Then a worker is killed (SIGKILL, its flow run with it) while its
run holds Tencent's one text-to-image job slot: the heartbeat automation marks that run Crashed,
the backfill ends, and the rerun completes the date. The emulators witness: no limit violated,
every image charged once per date."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from deployments import postgres, server
from sandbox.launcher import free_port
from tests.conftest import assert_within_limits, refusals
from tests.servers import BIN, cli, client_for, snapshot_repository, start, stop
from tests.test_pay_once import charges, configure, ledger_states, spec_text

pytestmark = pytest.mark.skipif(postgres.binaries() is None, reason="Debian's postgresql is not installed "
                                "(apt-get install postgresql); the recipe is for a PostgreSQL server")
PROVIDERS = ("tams", "chuzhan", "tencent")
WORKERS = ("worker-1", "worker-2", "worker-3")
DATES = 3
PER_WORKER = 3  # flow runs a worker runs at once (`--limit`): without it the first to poll takes them all


@pytest.fixture(scope="module")
def recipe(sandbox_blocks, tmp_path_factory):
    """The server, sandbox Blocks, deployments and three workers; yields (env, specs dir, workers)."""
    tmp = tmp_path_factory.mktemp("recipe")
    # PostgreSQL runs as its own user: its cluster must live where that user can reach.
    root = Path(tempfile.mkdtemp(prefix="imagegen-recipe-server-"))
    state = server.up(root, port=free_port(), database="postgres")
    assert state.database == "postgres"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_API_URL": state.api_url, "PREFECT_HOME": str(tmp / "client-home"),
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    specs = tmp / "specs"
    specs.mkdir()
    origin = snapshot_repository(tmp / "origin")
    cli(env, str(BIN / "imagegen"), "sandbox", "register", "--state-dir", sandbox_blocks.state_dir)
    setup = cli(env, str(BIN / "imagegen"), "setup-server", "--repository", str(origin), "--branch", "main")
    assert "automation 'imagegen: crash flow runs whose heartbeats stopped' created" in setup.stdout, setup.stdout
    cli(env, str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
    # Each worker on its own "machine": a directory with no flows; INFO so it logs what it takes.
    worker_env = {**env, "IMAGEGEN_SPEC_ROOTS": str(specs), "PREFECT_WORKER_QUERY_SECONDS": "2",
                  "PREFECT_LOGGING_LEVEL": "INFO"}
    workers = {}
    for name in WORKERS:
        home = tmp / name
        home.mkdir()
        workers[name] = start([str(BIN / "prefect"), "worker", "start", "--pool", "imagegen-process", "--name", name,
                               "--limit", str(PER_WORKER)],
                              {**worker_env, "PREFECT_HOME": str(home / "prefect")}, tmp / f"{name}.log", cwd=home)
    try:
        yield env, specs, workers
    finally:
        for proc in workers.values():
            stop(proc)
        server.down(root)
        shutil.rmtree(root, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def worker_of(env: dict[str, str], flow_run_id) -> str | None:  # noqa: ANN001
    """The worker that took a flow run: the one whose claim on it won labels it with its name as it
    starts it (`prefect.worker.name`). Not its "submitting" log line: a worker that lost the race
    for the run logs that line too."""
    with client_for(env) as client:
        return (client.read_flow_run(flow_run_id).labels or {}).get("prefect.worker.name")


def errors(path: Path, days: list[date]) -> dict[str, dict[str, str]]:
    """The errors each date's manifest records, by item."""
    from flows.backfill import manifest_status
    from flows.specs.spec import load_spec

    spec = load_spec(path)
    return {str(d): {i["item"]: i["error"] for i in (manifest_status(spec, d) or {}).get("items", []) if i.get("error")}
            for d in days}


def finish(proc: subprocess.Popen, seconds: float, what: str) -> str:
    """`proc`'s output once it ends; past `seconds`, kill it and fail with the tail of what it printed."""
    try:
        return proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} had not ended after {seconds:.0f} s; its last output:\n{proc.communicate()[0][-5000:]}")


def runs_named(env: dict[str, str], prefix: str) -> list:
    with client_for(env) as client:
        return [r for r in client.read_flow_runs() if r.name.startswith(prefix)]


def test_backfills_on_three_providers_spread_over_three_workers_within_every_limit(recipe, sandbox_blocks) -> None:
    env, specs, _ = recipe
    before = refusals(sandbox_blocks)
    start_day = date(2026, 10, 1)
    paths = {}
    for provider in PROVIDERS:
        name = f"recipe-{provider}"
        paths[provider] = specs / f"{name}.yaml"
        paths[provider].write_text(spec_text(provider, name, 2))
    # The three backfills at once, each through the deployment: 9 flow runs on three workers.
    procs = {p: subprocess.Popen([str(BIN / "imagegen"), "backfill", str(paths[p]), "--start", start_day.isoformat(),
                                  "--end", (start_day + timedelta(days=DATES - 1)).isoformat(),
                                  "--max-parallel", str(DATES)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for p in PROVIDERS}
    started = time.monotonic()
    outs = {p: proc.communicate(timeout=900)[0] for p, proc in procs.items()}
    took_s = time.monotonic() - started
    for provider, proc in procs.items():
        assert proc.returncode == 0, outs[provider][-3000:]
    # The dates' runs (`recipe-tams-2026-10-01`), on the workers; not the backfill's own run
    # (`recipe-tams-backfill-...`), which runs in the command's process.
    took = {worker_of(env, r.id) for p in PROVIDERS for r in runs_named(env, f"recipe-{p}-{start_day.year}-")}
    print(f"backfills of {DATES} dates x 3 providers (2 items each) took {took_s:.0f} s on {sorted(filter(None, took))}; "
          f"refusals {refusals(sandbox_blocks)} (before {before})")
    assert took == set(WORKERS), took
    assert_within_limits(sandbox_blocks, before)
    for provider in PROVIDERS:
        name = f"recipe-{provider}"
        assert charges(sandbox_blocks, provider, name) == {f"item {k} of {name}": DATES for k in range(2)}


def test_a_killed_worker_s_date_completes_on_rerun_paying_once(recipe, sandbox_blocks) -> None:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName

    env, specs, workers = recipe
    name, first = "recipe-killed", date(2026, 10, 10)
    days = [first + timedelta(days=n) for n in range(DATES)]
    path = specs / f"{name}.yaml"
    path.write_text(spec_text("tencent", name, 2))
    before = refusals(sandbox_blocks)
    configure(sandbox_blocks, "tencent", latency=20)  # a job outlasts finding its worker (up to 15 s) on a busy machine
    argv = [str(BIN / "imagegen"), "backfill", str(path), "--start", days[0].isoformat(), "--end",
            days[-1].isoformat(), "--max-parallel", str(DATES)]
    backfill = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, victim = time.monotonic() + 240, None
        while victim is None:
            assert backfill.poll() is None and time.monotonic() < deadline, "no run got as far as a submitted job"
            # A job just accepted (20 s to run) and nothing being sent: no kill between a send
            # and its answer, the one moment a person would have to settle (see test_pay_once).
            states = {d: set(ledger_states(path, d).values()) for d in days}
            if not any("sending" in s for s in states.values()):
                victim = next((d for d in days if "submitted" in states[d]), None)
            time.sleep(0.3)
        with client_for(env) as client:
            run = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"{name}-{victim}"])))[0]
        found_by = time.monotonic() + 15  # the worker labels the run as it starts it
        while (worker := worker_of(env, run.id)) is None and time.monotonic() < found_by:
            time.sleep(0.5)
        assert worker in workers, worker
        # The worker's machine dies: the worker and every flow run it started (each in a session
        # of its own, so a worker that dies alone leaves them running).
        for pid in [*descendants(workers[worker].pid), workers[worker].pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        configure(sandbox_blocks, "tencent", latency=0.6)
        out = finish(backfill, 400, "the backfill after the kill")
    finally:
        configure(sandbox_blocks, "tencent", latency=0.6)
        if backfill.poll() is None:
            backfill.kill()
    ended = time.monotonic() - killed
    with client_for(env) as client:
        crashed = client.read_flow_run(run.id)
    print(f"killed {worker} running {victim}: the run was marked {crashed.state.name} and the backfill ended "
          f"{ended:.0f} s after the kill")
    assert crashed.state.is_crashed(), crashed.state
    assert backfill.returncode == 1 and " failed " in out, out[-3000:]  # that date, the others done
    rerun = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = finish(rerun, 600, "the rerun")
    assert rerun.returncode == 0, out[-5000:] + str(errors(path, days))
    assert charges(sandbox_blocks, "tencent", name) == {f"item {k} of {name}": DATES for k in range(2)}
    assert_within_limits(sandbox_blocks, before)
    # The backfills themselves ran in this process, with no heartbeats, for longer than the
    # automation's 90 s: it watches only the deployments' runs, so they were never taken for dead.
    with client_for(env) as client:
        own = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["backfill"])))
    assert own and not [r.name for r in own if r.state.is_crashed()]
