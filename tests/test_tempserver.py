"""The temporary Prefect server a command starts without `PREFECT_API_URL` (`flows.tempserver`):
commands started at once on one Prefect home, and what its error says when it does not start.
(Its Ctrl-C, death and port: `tests/test_ctrl_c.py`.)"""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows import tempserver

ROOT = Path(__file__).parent.parent


@pytest.fixture()
def home(tmp_path: Path) -> Iterator[Path]:
    """A Prefect home of the test's own, as the process's settings (read once, not from the environment)."""
    from prefect.settings import PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_HOME: str(tmp_path)}):
        yield tmp_path


def test_the_log_tail_names_the_error_a_traceback_ends_in(home: Path) -> None:
    """The error's line was 600 characters of frames and SQL before the end: not shown."""
    error = "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) duplicate column name: state_timestamp"
    frames = "".join(f'  File "/venv/aiosqlite/core.py", line {n}, in _execute\n    return fn()\n' for n in range(40))
    (home / tempserver.LOG_NAME).write_text(f"Traceback (most recent call last):\n{frames}{error}\n[SQL: ALTER "
                                                f"TABLE flow_run ADD COLUMN state_timestamp]\n{frames}")
    said = tempserver.log_tail()
    assert said.startswith(error + " ... "), said[:300]
    assert said.endswith("return fn()"), said[-100:]


def test_the_start_lock_lets_one_server_of_a_home_start_at_a_time(home: Path, capsys) -> None:
    held, order = threading.Event(), []

    def first() -> None:
        with tempserver.starting_alone(30):
            held.set()
            time.sleep(1.0)
            order.append("first")

    thread = threading.Thread(target=contextvars.copy_context().run, args=(first,))  # the test's settings
    thread.start()
    held.wait(10)
    with tempserver.starting_alone(30):
        order.append("second")
    thread.join()
    assert order == ["first", "second"]
    assert f"waiting for another command's temporary Prefect server in {home} to start" in capsys.readouterr().err
    with tempserver.starting_alone(30):  # let go: taken again at once
        pass


@pytest.mark.slow  # three temporary servers on a new Prefect home (its database is created)
def test_commands_started_at_once_on_a_new_home_all_work(tmp_path) -> None:
    """Each command's server created the home's database at the same time: one failed with
    `duplicate column name` or `table worker already exists` (three at once: every time). The
    test holds the home's start lock until all three wait for it, so they do start together."""
    import fcntl

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    (tmp_path / "home").mkdir()
    with (tmp_path / "home" / tempserver.LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        commands = [subprocess.Popen([sys.executable, "-m", "flows.cli", "limits", "show"], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        for command in commands:  # each said it starts a server, then that it waits for the lock
            said = [command.stderr.readline() for _ in range(2)]
            assert "waiting for another command's temporary Prefect server" in said[1], said
    ended = [(command.wait(300), command.stderr.read()) for command in commands]
    assert [code for code, _ in ended] == [0, 0, 0], ended



def test_a_server_left_stopped_is_what_the_command_s_error_names(monkeypatch) -> None:
    """After the temporary server stopped too often, the command's last line asked whether the
    sandbox was up."""
    from types import SimpleNamespace

    import httpx
    from prefect.server.api.server import SubprocessASGIServer

    from flows.cli_errors import explain

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {None: SimpleNamespace(gave_up=False)})
    assert "is the sandbox up" in explain(refused)
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {None: SimpleNamespace(gave_up=True)})
    said = explain(refused)
    assert said.startswith("this command's temporary Prefect server kept stopping and was left stopped (ConnectError: "
                           "[Errno 111] Connection refused); its log says why: "), said
