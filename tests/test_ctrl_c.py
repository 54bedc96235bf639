"""Ctrl-C in the terminal of `imagegen run`, as a person presses it: the run in a pseudo-terminal,
`^C` written to it, so the terminal itself sends SIGINT to the foreground process group.

1. One Ctrl-C stops the run between paid calls: jobs already paid for are collected and archived,
   no new paid call starts, the command ends with 130 and says how to finish; the rerun pays for
   the rest. The emulator witnesses: every image charged once.
2. A second Ctrl-C leaves at once, telling the Prefect API the run crashed. (What a rerun does
   after a process that left at any moment is walked by the kill tests: `test_limits_and_faults`,
   `test_fault_matrix`.)
3. The temporary Prefect server a command starts (no `PREFECT_API_URL`) is out of the terminal's
   Ctrl-C (it died with it, and the run hung calling it), and dies with the command however
   the command dies.
4. Its port is the command's from the moment it is chosen, through its first start (creating its
   database) and a restart: another server cannot take it meanwhile and answer the command's calls.
5. SIGTERM stops a local backfill's dates between paid calls too, and a second one waits for the
   answer of a paid call on the wire.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pytest

from tests.test_fail_closed import run_logs_named, wait_for
from tests.test_limits_and_faults import cli_env
from tests.test_pay_once import (charges, configure, emulators, inject, ledger_states, once_each,  # noqa: F401
                                 spec_text, url, write_spec)

ROOT = Path(__file__).parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """`imagegen` in a pseudo-terminal of its own, its output kept."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal's foreground process group
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "flows.cli", *args], env)
        self.output = b""
        self.status: int | None = None

    @property
    def text(self) -> str:
        return ANSI.sub("", self.output.decode(errors="replace")).replace("\r", "\n")

    def read(self, seconds: float) -> None:
        """Read what it writes for up to `seconds`, or until it ends."""
        deadline = time.monotonic() + seconds
        while self.status is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:  # the child is gone and the terminal closed
                    pass
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)

    def until(self, text: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.text:
            assert self.status is None, f"ended ({self.status}) before {text!r}: {self.text[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in {seconds:.0f} s: {self.text[-3000:]}"
            self.read(0.5)

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")  # the terminal sends SIGINT to its foreground process group

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def pressed(emulators, args: list[str], *, latency: float, presses: int) -> tuple[Terminal, float]:  # noqa: ANN001, F811
    """`imagegen <args>` in a terminal, Tencent's jobs taking `latency` s: Ctrl-C once its first
    paid call is accepted, and again once it says it is stopping (`presses` 2); read to its end.
    The terminal, and the seconds from the last press to the end."""
    configure(emulators, "tencent", latency=latency)
    env = {**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO", "TERM": "xterm", "COLUMNS": "200"}
    term = Terminal(args, env)
    try:
        term.until("accepted request", 120)
        term.ctrl_c()
        if presses == 2:
            term.until("Ctrl-C: stopping", 10)
            term.ctrl_c()
        last = time.monotonic()
        term.read(120)
        return term, time.monotonic() - last
    finally:
        configure(emulators, "tencent", latency=0.6)
        term.kill()


def run_args(path: Path, day: date) -> list[str]:
    return ["run", str(path), "--run-date", day.isoformat()]


@pytest.mark.slow  # `imagegen run` processes
def test_one_ctrl_c_stops_between_paid_calls_and_the_rerun_pays_for_the_rest(emulators, tmp_path) -> None:  # noqa: F811
    name, day, n = "ctrlc-once", date(2026, 8, 11), 4
    path = write_spec(tmp_path, spec_text("tencent", name, n, ", max_parallel: 1"), name)
    term, _ = pressed(emulators, run_args(path, day), latency=1.5, presses=1)
    text = term.text
    assert term.status == 130, text[-3000:]
    assert "Ctrl-C: stopping. No new paid call starts" in text and "interrupted (Ctrl-C)" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    states = ledger_states(path, day)
    assert set(states.values()) == {"archived"} and 1 <= len(states) < n, states  # paid: collected; nothing sending
    assert charges(emulators, "tencent", name) == {f"item {k} of {name}": 1 for k in range(len(states))}

    rerun = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()],
                           env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert charges(emulators, "tencent", name) == once_each(name, n)


@pytest.mark.slow  # an `imagegen run` process
def test_a_second_ctrl_c_leaves_at_once_and_the_api_hears_the_run_crashed(emulators, tmp_path) -> None:  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    name, day, n = "ctrlc-twice", date(2026, 8, 12), 3
    path = write_spec(tmp_path, spec_text("tencent", name, n, ", max_parallel: 3"), name)
    term, took = pressed(emulators, run_args(path, day), latency=8.0, presses=2)  # its jobs outlast both presses
    text = term.text
    assert term.status == 130, text[-3000:]
    assert took < 20, f"{took:.1f} s after the second Ctrl-C: {text[-3000:]}"  # bound: a 3 s report, not a job
    assert "Ctrl-C again: leaving now" in text and "Traceback" not in text, text[-3000:]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{name}-{day}"])))
    assert [run.state.name for run in runs] == ["Crashed"], runs
    assert any("Ctrl-C: this run starts no more paid calls" in line for line in run_logs_named(f"{name}-{day}"))


@pytest.mark.slow  # two `imagegen run` processes
def test_ctrl_c_while_waiting_for_another_run_of_the_date_stops_the_wait(emulators, tmp_path) -> None:  # noqa: F811
    """A second run of a date waits for the first's claim; a Ctrl-C there ended nothing before
    (it waited on, up to the first run's end): now it stops the wait, paying nothing."""
    name, day, n = "ctrlc-waiting", date(2026, 8, 15), 5
    path = write_spec(tmp_path, spec_text("tencent", name, n, ", max_parallel: 1"), name)
    # The first run lasts well beyond the second's start: 32 s or more after its first paid
    # call, for a process that starts in 5-15 s on a busy machine.
    configure(emulators, "tencent", latency=8.0)
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", *run_args(path, day)], env=cli_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO", "TERM": "xterm", "COLUMNS": "200"}
    second = None
    try:
        wait_for("the first run's paid call", lambda: ledger_states(path, day), 120, first)
        second = Terminal(run_args(path, day), env)
        second.until("waiting for it to finish", 120)
        second.ctrl_c()
        pressed_at = time.monotonic()
        second.read(60)
        took = time.monotonic() - pressed_at
        assert first.wait(120) == 0
    finally:
        configure(emulators, "tencent", latency=0.6)
        first.kill()
        if second is not None:
            second.kill()
    assert second.status == 130 and took < 30, (took, second.text[-3000:])
    assert "stopped while waiting for a slot of imagegen:run:" in second.text, second.text[-3000:]
    assert charges(emulators, "tencent", name) == once_each(name, n)  # the first run's, once each


@pytest.mark.slow  # an `imagegen backfill` process
def test_a_second_ctrl_c_in_a_backfill_marks_its_dates_runs_crashed_too(emulators, tmp_path) -> None:  # noqa: F811
    """Each date's run is a flow run of its own, in a thread: left Running for good before."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    name, days = "ctrlc-backfill", (date(2026, 8, 13), date(2026, 8, 14))
    path = write_spec(tmp_path, spec_text("tencent", name, 2, ", max_parallel: 2"), name)
    term, _ = pressed(emulators, ["backfill", str(path), "--start", days[0].isoformat(), "--end", days[1].isoformat(),
                                  "--local", "--max-parallel", "2"], latency=8.0, presses=2)
    assert term.status == 130, term.text[-3000:]
    names = [f"{name}-{day}" for day in days]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
    assert runs and {run.state.name for run in runs} == {"Crashed"}, [(r.name, r.state.name) for r in runs]


@pytest.mark.slow  # an `imagegen backfill` process
def test_sigterm_stops_a_local_backfill_between_paid_calls_and_a_second_waits_for_the_call_on_the_wire(
        emulators, tmp_path) -> None:  # noqa: F811
    """SIGTERM (`kill`, a service manager) reached the backfill's own thread only: the date in
    flight, a run in a thread of its own, went on paying for every item it had left, saying
    nothing. And a second SIGTERM while a submit was on the wire ended the process at once:
    the provider charged it and its record stayed `sending`, for a person to settle."""
    name, day, n = "sigterm-twice", date(2026, 8, 16), 3
    path = write_spec(tmp_path, spec_text("tencent", name, n, ", max_parallel: 1"), name)
    inject(emulators, "tencent", kind="slow", action="SubmitTextToImageJob", delay=4, count=n)
    term = Terminal(["backfill", str(path), "--start", day.isoformat(), "--end", day.isoformat(), "--local"],
                    {**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO", "TERM": "xterm", "COLUMNS": "200"})
    try:
        # Up to 300 s: the test before leaves Tencent's one job slot to a process it killed, until
        # that lease expires (failed so at 120 s in a fresh clone's suite). Its output read meanwhile.
        deadline = time.monotonic() + 300
        while "sending" not in ledger_states(path, day).values():
            assert term.status is None and time.monotonic() < deadline, term.text[-3000:]
            term.read(0.3)
        os.kill(term.pid, signal.SIGTERM)
        term.until("told to stop (SIGTERM or a cancel)", 30)
        os.kill(term.pid, signal.SIGTERM)
        term.read(120)
    finally:
        term.kill()
        httpx.delete(f"{url(emulators, 'tencent')}/_sandbox/faults")
    text = term.text
    assert "told to stop (SIGTERM or a cancel): no date starts from now" in text, text[-3000:]
    assert "SIGTERM again: still waiting" in text and "Traceback" not in text, text[-3000:]
    states = ledger_states(path, day)
    assert "sending" not in states.values() and states.get("i0") in ("submitted", "archived"), states
    paid = {f"item {item[1:]} of {name}": 1 for item, state in states.items() if state in ("submitted", "archived")}
    assert charges(emulators, "tencent", name) == paid and len(paid) < n, states  # no paid call after the first
    rerun = subprocess.run([sys.executable, "-m", "flows.cli", "backfill", str(path), "--start", day.isoformat(),
                            "--end", day.isoformat(), "--local"], env=cli_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert charges(emulators, "tencent", name) == once_each(name, n)


GUARDED = """
import signal, sys, time
from flows import tempserver
server = tempserver.start()
signal.signal(signal.SIGINT, signal.SIG_IGN)  # this command outlives the Ctrl-C, to see the server's fate
print(server.server_process.pid, server.api_url, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow  # a temporary Prefect server on a new Prefect home (its database is created)
def test_the_temporary_server_is_out_of_the_terminals_ctrl_c_and_dies_with_the_command(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = subprocess.Popen([sys.executable, "-c", GUARDED], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.PIPE, start_new_session=True)  # a terminal's job: a process group
    server = None
    try:
        pid, api = command.stdout.readline().split()
        server = int(pid)
        assert os.getpgid(server) == server != os.getpgid(command.pid)
        os.killpg(command.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the command's process group
        time.sleep(1.0)
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200  # the server did not get it
        command.kill()  # however the command dies (here `kill -9`), the server goes with it
        command.wait(10)
        wait_for("the server's end", lambda: not alive(server), 30)
        said = command.stderr.read()
        assert "Traceback" not in said and "uvicorn" not in said, said  # its words go to its log, not the terminal
        assert (tmp_path / "home" / "temporary-server.log").exists()
    finally:
        command.kill()
        if server is not None and alive(server):
            os.kill(server, signal.SIGKILL)


RESERVED = """
import sys, time
from flows import tempserver
tempserver.register("starting")
server = tempserver.start()
print(server.server_process.pid, server.api_url, flush=True)
time.sleep(600)
"""


def port_taken(port: int) -> bool:
    """True when nothing else can listen on loopback's `port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.slow  # a temporary Prefect server on a new Prefect home (its database is created)
def test_the_temporary_server_s_port_is_the_command_s_while_it_starts_and_restarts(tmp_path) -> None:
    """Prefect checked that a port was free, then let the server bind it after creating its
    database, up to a minute later; another temporary server took it meanwhile (a test run on
    four workers did), and the command's calls went to that one: `sandbox register` failed with
    a 404. The command now holds the port from the start, and through a restart."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = subprocess.Popen([sys.executable, "-c", RESERVED], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        note = command.stderr.readline()
        port = int(re.search(r"its API: http://127\.0\.0\.1:(\d+)/api", note)[1])
        assert port_taken(port)  # while the server creates its database, before it serves
        pid, api = command.stdout.readline().split()
        assert api == f"http://127.0.0.1:{port}/api"
        os.kill(int(pid), signal.SIGKILL)  # the server dies; the command starts it again on its port
        wait_for("the server's end", lambda: not alive(int(pid)), 30)
        assert port_taken(port)
        wait_for("the restarted server", lambda: httpx.get(f"{api}/health", timeout=30).status_code == 200, 120)
        assert "starting it again on " + api in command.stderr.readline()
    finally:
        os.killpg(command.pid, signal.SIGKILL)
        command.wait(10)
