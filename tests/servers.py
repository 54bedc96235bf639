"""Helpers for tests that run a real `prefect server start`, workers and the CLI as processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deployments import processes

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    return processes.spawn(cmd, log, env=env, cwd=cwd)


def stop(proc: subprocess.Popen) -> None:
    processes.stop(proc.pid)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until the API at `url` answers its health check (the process still alive)."""
    processes.wait_until(processes.answers(f"{url}/health"), proc.pid, log, what=url, timeout=timeout,
                         error=AssertionError)


def clone_sharing_this_venv(into: Path) -> Path:
    """A fresh `git clone` of the committed checkout at `into`, as a new user gets it, whose
    `.venv` is this one (already set up for it): `make` there finds it installed."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(into)], check=True)
    (into / ".venv").symlink_to(Path(sys.prefix))
    stamp = Path(sys.prefix) / ".installed-stamp"
    if stamp.exists():  # older than the stamp, so make does not install again
        old = stamp.stat().st_mtime - 60
        for name in ("pyproject.toml", "requirements.txt", "constraints.txt"):
            os.utime(into / name, (old, old))
    return into


def snapshot_repository(into: Path) -> Path:
    """A git repository holding this working tree as it is (tracked and new files), committed."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *args], cwd=into, check=True)
    return into


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def client_for(env: dict[str, str]):  # noqa: ANN201
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=env["PREFECT_API_URL"])


def wait_final(client, flow_run_id, timeout: float = 240):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"flow run still {run.state.name if run.state else None}"
        time.sleep(1)


def logs_of(client, flow_run_ids, must_contain: str, timeout: float = 60) -> list[str]:  # noqa: ANN001
    """The runs' log lines, waiting until one contains `must_contain` (a run's logs are shipped in
    batches, after its final state may already be set) or the timeout passes."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        lines = [log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_run_ids))), limit=200)]
        if any(must_contain in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(1)
