"""Shared fixtures: a Prefect test harness (real API on temp SQLite) and a real sandbox
(TAMS emulator process + SeaweedFS process) on free loopback ports, one per session.

Tiers: each test is marked by what it starts (`pytest_collection_modifyitems` below): `sandbox`
(emulator and S3 processes), `server` (a Prefect API), `slow` (seconds to minutes: a fresh
`imagegen` process per call, kills, workers, replicas, fresh clones, the benchmark); `unit` is
everything else, what `make check` runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs files in parallel: a Prefect home each
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"imagegen-test-prefect-{os.environ['PYTEST_XDIST_WORKER']}-")
else:
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="imagegen-test-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# As `imagegen run` does on its own server: leases on disk, so a killed run's slots can be reclaimed.
os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
# The test harness is an ephemeral server (no repossessor runs) that is reached by URL.
os.environ.setdefault("IMAGEGEN_RECLAIM_LEASES", "1")
# Tests that kill a run wait for its leases to expire: Prefect's minimum lease, not the default
# (three minutes, `LEASE_SECONDS`), which `tests/test_server_e2e.py` uses on a real server.
os.environ.setdefault("IMAGEGEN_LEASE_SECONDS", "60")
# Specs written in tmp folders use the project's sample input images.
os.environ.setdefault("IMAGEGEN_INPUT_ROOTS", str(Path(__file__).resolve().parent.parent / "pipelines" / "assets"))

import httpx  # noqa: E402
import pytest  # noqa: E402

from sandbox import launcher  # noqa: E402

DATA = Path(__file__).parent / "data"
TEST_BUCKET = "imagegen-test"

# Fixtures that start processes, by the tier marker they give a test that uses them (directly or
# through another fixture). Tests that start such things themselves carry the marker in their file.
SANDBOX_FIXTURES = frozenset({"sandbox", "toy"})
SERVER_FIXTURES = frozenset({"prefect_api", "server", "deployed", "recipe", "replicas", "receiver"})
# Tests that take seconds to minutes for what no fixture gives away: `file` (all of it),
# `file::test` (all its parameters) or `file::test[params]`.
SLOW = frozenset({
    # minutes: kills and reruns, workers, replicas, fresh clones, the benchmark
    "test_limits_and_faults.py::test_killed_run_resumes_without_paying_twice",
    "test_pay_once.py::test_a_killed_run_frees_its_slots_and_the_rerun_pays_once",
    "test_pay_once.py::test_on_the_embedded_server_a_killed_run_never_blocks_the_lane_for_good",
    "test_pay_once.py::test_the_temporary_server_killed_mid_run_is_started_again_and_the_run_completes",
    "test_workers_recipe.py",
    "test_api_replicas.py",
    "test_readme.py",
    "test_benchmark.py::test_benchmark_smoke",
    "test_first_hour.py",  # `make demo` in a fresh clone; its other tests as below
    "test_fail_closed.py::test_a_run_that_loses_its_claim_in_an_outage_starts_no_paid_call_after_it",
    "test_server_restart.py",  # a Prefect server stopped and started again, a lease outlived
    "test_sandbox_restart.py",  # the sandbox stopped and started again (SeaweedFS twice)
    # 3-12 s each: a fresh `imagegen` process (it imports Prefect) per call, Real-ESRGAN
    "test_spec.py::test_cli_validate",
    "test_spec.py::test_cli_validate_applies_provider_rules",
    "test_spec.py::test_an_items_own_setting_is_checked_at_its_line",
    "test_hostile_specs.py::test_validate_refuses_each_in_one_process_with_bounded_memory",
    "test_fourth_provider.py::test_sandbox_up_refuses_a_taken_port_and_names_its_holder",
    "test_review.py::test_local_upscale_of_a_real_image[realesrgan-2]",
    "test_review.py::test_local_upscale_of_a_real_image[realesrgan-4]",
    "test_benchmark.py::test_the_end_of_a_run_alone",  # a sandbox and a Prefect server of its own
})
TIERS = ("sandbox", "server", "slow")
# The files that take longest in all (minutes), longest first: `make test` starts them first.
LONGEST_FIRST = ("test_fail_closed.py", "test_prefect_away.py", "test_pay_once.py", "test_workers_recipe.py", "test_readme.py",
                 "test_fault_matrix.py", "test_first_hour.py", "test_server_restart.py", "test_server_e2e.py",
                 "test_limits_and_faults.py", "test_benchmark.py", "test_api_replicas.py")


def tiers_of(item: pytest.Item) -> set[str]:
    """The tier markers `item` gets from its fixtures and the SLOW list."""
    fixtures = set(getattr(item, "fixturenames", ()))
    names = {item.path.name, f"{item.path.name}::{getattr(item, 'originalname', item.name)}",
             f"{item.path.name}::{item.name}"}
    return ({"sandbox"} if fixtures & SANDBOX_FIXTURES else set()) \
        | ({"server"} if fixtures & SERVER_FIXTURES else set()) \
        | ({"slow"} if names & SLOW else set())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for tier in tiers_of(item):
            item.add_marker(tier)
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker("unit")
    # The longest files first, then those with slow tests, unit files last: `make test` hands whole
    # files to its parallel workers in this order, so the long ones start early and short ones fill
    # the gaps.
    rank: dict[Path, int] = {}
    for item in items:
        tier = 0 if item.get_closest_marker("slow") else 2 if item.get_closest_marker("unit") else 1
        mine = LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST) + tier
        rank[item.path] = min(rank.get(item.path, mine), mine)
    items.sort(key=lambda item: rank[item.path])  # stable: a file's tests stay together, in order


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    import prefect.testing.utilities as harness
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows import tempserver

    # The command's temporary server: its port held from the start. Prefect's harness server binds
    # its port only after creating its database, and four workers' servers start at once.
    harness.SubprocessASGIServer = tempserver.server_class()
    with harness.prefect_test_harness(server_startup_timeout=120):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[launcher.SandboxState]:
    state_dir = tmp_path_factory.mktemp("sandbox")
    state = launcher.up_on_free_ports(state_dir, latency=0.6, buckets=(TEST_BUCKET,))
    try:
        yield state
    finally:
        launcher.down(state_dir)


@pytest.fixture(scope="session")
def sandbox_blocks(prefect_api: None, sandbox: launcher.SandboxState) -> launcher.SandboxState:
    from deployments.limits import apply_limits

    launcher.register_blocks(sandbox)
    apply_limits({p: [launcher.BLOCK_NAME] for p in sandbox.providers})
    return sandbox


def run_spec(tmp_path: Path, text: str, run_date: date, path: Path | None = None):  # noqa: ANN201 - a Prefect State
    """Write a spec (at `path`, or one file per test: a pipeline name belongs to one spec file)
    and run the flow on it for `run_date`; returns the flow run's final state."""
    from flows.pipeline import run_pipeline

    path = path or tmp_path / "spec.yaml"
    path.write_text(text)
    return run_pipeline(spec=str(path), run_date=run_date, return_state=True)


def tams_stats(state: launcher.SandboxState) -> dict:
    return httpx.get(f"{state.url('tams')}/_sandbox/stats").json()


def chuzhan_stats(state: launcher.SandboxState) -> dict:
    return httpx.get(f"{state.url('chuzhan')}/_sandbox/stats").json()


def tencent_stats(state: launcher.SandboxState) -> dict:
    return httpx.get(f"{state.url('tencent')}/_sandbox/stats").json()


def refusals(state: launcher.SandboxState) -> dict[str, int]:
    """What the emulators refused as over a limit so far: rates and in-flight caps apart."""
    return _refusal_counts(tams_stats(state), chuzhan_stats(state), tencent_stats(state))


def _refusal_counts(tams: dict, chuzhan: dict, tencent: dict) -> dict[str, int]:
    return {"tams rate": tams["rate_limited"], "chuzhan tasks": chuzhan["limit_rejections"],
            "tencent rate": tencent["rate_limited"], "tencent jobs": tencent["job_num_exceeded"]}


def assert_within_limits(state: launcher.SandboxState, before: dict[str, int]) -> None:
    """No in-flight cap was ever exceeded (slots are leases, held submit to result), and each
    rate refused at most one request. A rate slot's request can reach the provider late on a
    loaded machine (four test workers, several runs and servers on two cores): a Prefect server
    answers a slot call up to hundreds of milliseconds after the time it gave the slot (README,
    "Rates are spaced"), and the request then meets the next slot's within the provider's second.
    The client waits the refusal's Retry-After and sends again, uncharged; the callers check
    what was charged. Limits kept apart per process would be refused dozens of times. A failure
    shows the emulators' last refusals: each refused request with those of the second before it,
    each refused job with the jobs running then."""
    tams, tencent = tams_stats(state), tencent_stats(state)
    after = _refusal_counts(tams, chuzhan_stats(state), tencent)
    grew = {k: after[k] - before[k] for k in after}
    seen = {"tams": tams["rate_refusals"], "tencent": tencent["rate_refusals"], "tencent jobs": tencent["job_refusals"]}
    assert all(grew[k] == 0 for k in grew if not k.endswith("rate")), (before, after, seen)
    assert all(grew[k] <= 1 for k in grew), (before, after, seen)


def s3_client(state: launcher.SandboxState):  # noqa: ANN201
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=state.s3_url, aws_access_key_id=state.s3_access_key,
                        aws_secret_access_key=state.s3_secret_key, region_name="us-east-1",
                        config=Config(signature_version="s3v4"))


def run_logs(state, wanted: str, timeout: float = 20.0) -> list[str]:  # noqa: ANN001 - a Prefect State
    """The flow run's log lines on the Prefect API, once one containing `wanted` arrived (the
    API log handler sends them in batches)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            lines = [log.message for log in client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))]
            if any(wanted in line for line in lines) or time.monotonic() > deadline:
                return lines
            time.sleep(0.5)


@pytest.fixture()
def flow_logs_at_info() -> Iterator[None]:
    """Flow-run INFO lines (progress, a person's decision) reach the API in this test; the suite
    otherwise logs WARNING and up."""
    import logging

    logger = logging.getLogger("prefect.flow_runs")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def latest_artifacts(*keys: str) -> dict:
    """The latest artifact of each key, asked by key (a plain listing is one page, which other
    tests' artifacts may fill first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=list(keys))))
    return {a.key: a for a in found}
