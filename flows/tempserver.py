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

The server is registered where Prefect looks for it (`SubprocessASGIServer()`, keyed by no
port), so every client of the process uses it, and it starts when the first of them needs it
(a spec refused first starts none), saying so. The death signal follows the thread that
started the child: it is asked for only when that is the main thread, which lives as long as
the process; otherwise the server is stopped at exit only, as Prefect's is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
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


def server_command(port: int, parent: int) -> list[str]:
    """The server's command line: Prefect's own (uvicorn on Prefect's app factory, API only),
    behind `GUARD` (`parent` 0: no death signal)."""
    import prefect

    return [sys.executable, "-c", GUARD, str(parent), "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


def _shielded_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class ShieldedServer(SubprocessASGIServer):
        """Prefect's temporary server in a process group of its own, started again when it
        stops while the command still needs it (see the module)."""

        note = ""
        log_mode = "wb"  # a restart appends: the log says why the last one stopped
        stopping = False

        def start(self, timeout: int | None = None) -> None:
            if not self.running and self.note:
                print(f"{self.note}; its log: {log_path()}", file=sys.stderr, flush=True)
            was_running = self.running
            try:
                super().start(timeout)
            except RuntimeError as exc:  # it did not answer: what it said is in its log
                waited = get_current_settings().server.ephemeral.startup_timeout_seconds
                raise RuntimeError(f"{str(exc).splitlines()[0]} Its log ({log_path()}) ends: {log_tail()}. If it "
                                   f"only needs longer, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
                                   f"({waited} s now), or set PREFECT_API_URL to a lasting server") from None
            if not was_running:
                threading.Thread(target=self._watch, name=WATCHDOG, daemon=True).start()

        def stop(self) -> None:
            self.stopping = True  # before the server ends: its watchdog must not start it again
            super().stop()

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
                    return
                print(f"the temporary Prefect server stopped (exit {code}); starting it again on {self.api_url}, "
                      f"on the same database: the run goes on. Its log: {log_path()}", file=sys.stderr, flush=True)
                self.log_mode = "ab"
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
                return subprocess.Popen(server_command(self.port, os.getpid() if main else 0), env=env,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **own_group)

    return ShieldedServer


LOG_NAME = "temporary-server.log"
WATCHDOG = "imagegen-temporary-server-watchdog"  # the thread that starts a stopped server again
MAX_RESTARTS = 3  # in a minute: a server that keeps stopping is left stopped
TAIL_CHARACTERS = 600


def log_path() -> Path:
    """Where the temporary server writes what it says (the last start's only): in `PREFECT_HOME`."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / LOG_NAME


def log_tail() -> str:
    """The end of the server's log, on one line."""
    try:
        text = log_path().read_bytes()[-TAIL_CHARACTERS:].decode(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or "(empty)"


def register(note: str = "") -> Any:
    """Make the process's temporary server the shielded one (started when first needed, saying
    `note` then); return it. Before any Prefect client of the process exists."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    if server is None:
        server = _shielded_class()()
        server.note = note
    return server


def start() -> Any:
    """Start the shielded temporary server now (or return the one already started)."""
    server = register()
    server.start()
    return server
