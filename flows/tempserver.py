"""Prefect's temporary server, out of the terminal's Ctrl-C, never outliving the command.

Any `imagegen` command without `PREFECT_API_URL` talks to a temporary Prefect server that
Prefect starts as a child process (`SubprocessASGIServer`, uvicorn). Prefect starts it in the
command's process group, so a person's Ctrl-C in the terminal reaches it too: it died at once
while the run it served could no longer record anything, and `imagegen run` hung retrying calls
to it. `start()` starts the same server, the same way, with two differences:

- its own process group: a Ctrl-C reaches `imagegen` alone, which stops its run and then stops
  the server (`atexit`, as Prefect does);
- on Linux it gets SIGTERM when `imagegen` dies, however it dies (`PR_SET_PDEATHSIG`): out of
  the terminal's process group, a closed terminal or a `kill -9` would otherwise orphan it;
- what it says goes to `temporary-server.log` in `PREFECT_HOME`, not the terminal: a server
  stopped while it writes (the command left at once) printed a traceback over the shell's
  prompt. A server that does not start says why, from its log, in the command's error;
- a server that stops while the command still needs it (killed by a person, or by the kernel
  short of memory) is started again on its port, on the same database and lease files, saying
  so: the run goes on as through a short Prefect outage. It used to hang, every call refused,
  for as long as Prefect's client retried them. After `MAX_RESTARTS` in a minute it is left
  stopped, saying why.
- its port is its own from the moment it is chosen: the command binds it and hands the
  listening socket to the server (`uvicorn --fd`). Prefect only checks that a port is free and
  lets the server bind it after creating its database, up to a minute later: another temporary
  server took the same port meanwhile, this one could not bind it, and the command's calls went
  to the other server (its Blocks, its limits, its leases). A restarted server gets the same
  socket, so nothing takes its port while it starts again either;
- commands started at once on one `PREFECT_HOME` start their servers one after the other
  (`starting_alone`): each server creates or upgrades the home's database as it starts, and two
  at once failed.

The server is registered where Prefect looks for it (`SubprocessASGIServer()`, keyed by no
port), so every client of the process uses it, and it starts when the first of them needs it
(a spec refused first starts none), saying so. The death signal follows the thread that
started the child: it is asked for only when that is the main thread, which lives as long as
the process; otherwise the server is stopped at exit only, as Prefect's is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GUARD = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    if sys.argv[1] != '0':\n"
    "        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (AttributeError, OSError, TypeError):\n"
    "    pass  # not Linux: the server is stopped at exit only\n"
    "if sys.argv[1] != '0' and os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)  # the command died before the signal was set\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)
"""Run before uvicorn in the server's process: ask for SIGTERM when the parent dies, then exec."""


def server_command(fd: int, parent: int) -> list[str]:
    """The server's command line: Prefect's own (uvicorn on Prefect's app factory, API only),
    serving the listening socket `fd`, behind `GUARD` (`parent` 0: no death signal)."""
    import prefect

    return [sys.executable, "-c", GUARD, str(parent), "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--fd", str(fd),
            "--log-level", "error", "--lifespan", "on"]


PORTS = range(8000, 9000)
"""Where a temporary server listens, as Prefect's do: out of the kernel's range for ports it
picks itself, so a port another program chose that way and will bind soon is never taken."""


def listener() -> socket.socket:
    """A listening socket on a free loopback port of `PORTS` (the kernel's pick when none is)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for candidate in [*random.sample(PORTS, 50), 0]:
        try:
            sock.bind(("127.0.0.1", candidate))
            break
        except OSError:
            if candidate == 0:
                sock.close()
                raise
    sock.listen(2048)
    return sock


def answering(url: str, process: subprocess.Popen[Any], seconds: float) -> bool:
    """Wait up to `seconds` for the server at `url` to answer its health check; False when the
    time ran out. Raises `ServerExited` when `process` ended first."""
    import httpx

    deadline = time.monotonic() + seconds
    with httpx.Client() as client:
        while (left := deadline - time.monotonic()) > 0:
            if (code := process.poll()) is not None:
                raise ServerExited(code)
            try:  # the socket listens from the start: a call waits until the server serves it
                if client.get(f"{url}/health", timeout=min(left, 5.0)).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    return False


class ServerExited(RuntimeError):
    """The temporary server's process ended before it answered."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the temporary Prefect server exited (code {code}) before it answered.")


def server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class ShieldedServer(SubprocessASGIServer):
        """Prefect's temporary server in a process group of its own, started again when it
        stops while the command still needs it (see the module)."""

        note = ""
        log_mode = "wb"  # a restart appends: the log says why the last one stopped
        stopping = False
        gave_up = False  # stopped too often: left stopped (`flows.cli_errors` says so)

        socket: Any = None  # the listening socket the server serves, held by the command

        def start(self, timeout: int | None = None) -> None:
            if self.running:
                return
            waited = timeout or get_current_settings().server.ephemeral.startup_timeout_seconds
            self.socket = listener()  # a port asked for (the test harness's) is free now, maybe not for long
            self.port = self.socket.getsockname()[1]
            if self.note:
                print(f"{self.note}; its API: {self.api_url}, its log: {log_path()}", file=sys.stderr, flush=True)
            self.running, self.stopping = True, False
            try:
                with starting_alone(waited):
                    self.server_process = self._run_uvicorn_command()
                    atexit.register(self.stop)
                    if not answering(self.api_url, self.server_process, waited):
                        raise RuntimeError(f"the temporary Prefect server did not answer in {waited} s.")
            except RuntimeError as exc:  # what it said is in its log
                self._abandon()
                longer = "" if isinstance(exc, ServerExited) else (
                    f" If it only needs longer, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ({waited} s "
                    "now), or set PREFECT_API_URL to a lasting server")
                raise RuntimeError(f"{exc} Its log ({log_path()}) ends: {log_tail()}.{longer}") from None
            threading.Thread(target=self._watch, name=WATCHDOG, daemon=True).start()

        def stop(self) -> None:
            self.stopping = True  # before the server ends: its watchdog must not start it again
            super().stop()
            self._let_go()

        def _abandon(self) -> None:
            """End a server that did not start (it stays the process's server: not `stop`)."""
            self.stopping = True
            if self.server_process is not None:
                self.server_process.kill()
                self.server_process.wait()
                self.server_process = None
            self.running = False
            self._let_go()

        def _let_go(self) -> None:
            """Close the listening socket: calls to the server are refused, not left waiting."""
            if self.socket is not None:
                self.socket.close()
                self.socket = None

        def _watch(self) -> None:
            """Start the server again whenever it stops before the command asked it to."""
            restarts: list[float] = []
            while (process := self.server_process) is not None:
                code = process.wait()
                if self.stopping or self.server_process is not process:
                    return
                now = time.monotonic()
                restarts = [at for at in restarts if now - at < 60.0] + [now]
                if len(restarts) > MAX_RESTARTS:
                    print(f"the temporary Prefect server stopped again (exit {code}), {MAX_RESTARTS} times in a "
                          f"minute: it is not started again, and this command's Prefect calls fail. Its log: "
                          f"{log_path()}", file=sys.stderr, flush=True)
                    self._let_go()
                    self.gave_up = True
                    return
                print(f"the temporary Prefect server stopped (exit {code}); starting it again on {self.api_url}, "
                      f"on the same database: the command goes on. Its log: {log_path()}", file=sys.stderr, flush=True)
                self.log_mode = "ab"
                if self.stopping or self.socket is None:  # the command stopped it meanwhile
                    return
                self.server_process = self._run_uvicorn_command()

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            # The death signal follows the starting thread: the main one, or the watchdog (which
            # waits on the server as long as the command lives).
            main = threading.current_thread() is threading.main_thread() or threading.current_thread().name == WATCHDOG
            own_group: dict[str, Any] = {"process_group": 0} if os.name == "posix" else {}
            log_path().parent.mkdir(parents=True, exist_ok=True)
            with log_path().open(self.log_mode) as log:  # the child keeps its own copy of the descriptor
                fd = self.socket.fileno()
                return subprocess.Popen(server_command(fd, os.getpid() if main else 0), env=env, pass_fds=(fd,),
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **own_group)

    return ShieldedServer


LOG_NAME = "temporary-server.log"
LOCK_NAME = "temporary-server.lock"  # held while one of the home's temporary servers starts
WATCHDOG = "imagegen-temporary-server-watchdog"  # the thread that starts a stopped server again
MAX_RESTARTS = 3  # in a minute: a server that keeps stopping is left stopped
TAIL_CHARACTERS = 600


def log_path() -> Path:
    """Where the temporary server writes what it says (the last start's only): in `PREFECT_HOME`."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / LOG_NAME


def log_tail() -> str:
    """The end of the server's log, on one line, after the last error it names (a traceback's
    end is often frames or SQL only)."""
    try:
        text = log_path().read_bytes().decode(errors="replace")
    except OSError:
        return "(no log)"
    errors = ERROR_LINE.findall(text)
    tail = " | ".join(line.strip() for line in text[-TAIL_CHARACTERS:].splitlines() if line.strip()) or "(empty)"
    return f"{errors[-1].strip()[:TAIL_CHARACTERS]} ... {tail}" if errors and errors[-1].strip() not in tail else tail


ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*$", re.MULTILINE)
"""A traceback's last line: `sqlalchemy.exc.OperationalError: (...) duplicate column name`."""


@contextlib.contextmanager
def starting_alone(seconds: float) -> Iterator[None]:
    """Hold `PREFECT_HOME`'s start lock while a temporary server starts: one of a home at a time.
    Two commands started at once on a new home each started a server, and both created the
    database (`duplicate column name`, `table worker already exists`): one command failed."""
    if os.name != "posix":
        yield
        return
    import fcntl

    path = log_path().with_name(LOCK_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline, said = time.monotonic() + seconds, False
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another command's temporary Prefect server in {path.parent} did not start "
                                       f"in {seconds} s.") from None
                if not said:
                    print(f"waiting for another command's temporary Prefect server in {path.parent} to start",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def given_up() -> bool:
    """True when this process's temporary server kept stopping and was left stopped."""
    module = sys.modules.get("prefect.server.api.server")  # not imported: no temporary server started
    return module is not None and bool(getattr(module.SubprocessASGIServer._instances.get(None), "gave_up", False))


def register(note: str = "") -> Any:
    """Make the process's temporary server the shielded one (started when first needed, saying
    `note` then); return it. Before any Prefect client of the process exists."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    if server is None:
        server = server_class()()
        server.note = note
    return server


def start() -> Any:
    """Start the shielded temporary server now (or return the one already started)."""
    server = register()
    server.start()
    return server
