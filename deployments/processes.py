"""The one way this project starts, waits for and stops a process it runs in the background:
the sandbox's emulators and S3 server, a Prefect server (`imagegen server up`, the benchmark's,
the tests'), a worker. Each runs in a session of its own (so stopping it stops its children),
its output appended to a log that an error quotes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx


class NotStarted(RuntimeError):
    """A process ended, or did not answer in time, while starting."""


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session, stdin closed, stdout and stderr appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child of ours counts as ended, and is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def answers(url: str, healthy: bool = True) -> Callable[[], bool]:
    """A check: `url` answers a GET (with 200, when `healthy`)."""
    def check() -> bool:
        try:
            status = httpx.get(url, timeout=2).status_code
        except httpx.TransportError:
            return False
        return status == 200 or not healthy
    return check


def wait_until(ready: Callable[[], bool], pid: int, log: Path, *, what: str, timeout: float,
               error: type[Exception] = NotStarted) -> None:
    """Wait until `ready()`, raising `error` (with the end of `log`) if `pid` ends or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive(pid):
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise error(f"{what} (process {pid}) exited while starting; log {log}:\n{tail}")
        if time.monotonic() > deadline:
            raise error(f"{what} did not answer within {timeout:.0f} s; log {log}")
        time.sleep(0.2)


def stop(pid: int, grace: float = 15.0) -> None:
    """Stop `pid`'s session: SIGTERM, then SIGKILL after `grace` seconds. Nothing if it is gone."""
    stop_all([pid], grace)


def stop_all(pids: list[int], grace: float = 15.0) -> None:
    """Stop these sessions together (SIGTERM to all, then SIGKILL to those still running after
    `grace` seconds): as long as the slowest takes, not the sum of them."""
    running = list(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        running = [pid for pid in running if _signal(pid, sig)]
        deadline = time.monotonic() + wait
        while any(alive(pid) for pid in running) and time.monotonic() < deadline:
            time.sleep(0.05)
        running = [pid for pid in running if alive(pid)]
        if not running:
            return


def _signal(pid: int, sig: signal.Signals) -> bool:
    """Send `sig` to `pid`'s session; False when it is gone (or not ours)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
