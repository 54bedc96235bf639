"""A flow-run process that outlives the worker (or terminal) that started it.

Measured with Prefect 3.8.8's process worker (README, "When a worker's machine dies"): a
worker killed with SIGKILL sends its flow-run processes no signal (each runs in a session of
its own), but their stdout and stderr are pipes only the worker read. The next line Prefect's
console handler wrote raised `BrokenPipeError` inside rich, whose `Console.on_broken_pipe`
raises `SystemExit(1)`: in whichever thread was logging, at any point of a paid call. A
Tencent item paid for was left `sending` (its "accepted" line was being logged), and the
process was gone 12 s after the worker. Importing this module changes that for the process:

- a rich console whose output is gone goes quiet (its file descriptor now writes to
  /dev/null) instead of exiting; the run's log still reaches the Prefect API, and one line
  there says the console is gone;
- SIGPIPE stays ignored (Python's default), so writing to a dead pipe is an error, not death.

And while a run holds its claim (`stop_on_hangup`), SIGHUP (a closed terminal, or a person:
`kill -HUP <pid>`) stops it between paid calls: no paid call starts after it
(`flows.paying.paidcalls.RunStopping`), calls already sent are recorded, and jobs already paid for
are polled to the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from flows.paying import paidcalls

_loggers: list[Any] = []  # the logger of the run in progress, where a run holds its claim


def _later(message: str) -> None:
    """Log `message` on the run's log from a thread of its own (never from inside a console
    write or a signal handler, which may hold the logging locks)."""
    if _loggers:
        logger = _loggers[-1]
        threading.Thread(target=logger.warning, args=(message,), daemon=True).start()


def _quiet_on_broken_pipe(console: Console) -> None:
    """rich's `Console.on_broken_pipe`, without its `SystemExit`: the console goes quiet and its
    file descriptor writes to /dev/null from now on."""
    if console.quiet:
        return
    console.quiet = True
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, console.file.fileno())
        os.close(devnull)
    _later("this process's console is gone (the worker or terminal that started it died); the run goes on, "
           "logging here only")


Console.on_broken_pipe = _quiet_on_broken_pipe  # type: ignore[method-assign]


def _hang_up(signum: int, frame: Any) -> None:
    paidcalls.request_stop("the process got SIGHUP")
    _later("SIGHUP: this run starts no more paid calls; calls already sent are recorded and jobs already paid for "
           "are polled to the end, then it ends")


@contextlib.contextmanager
def stop_on_hangup(logger: Any) -> Iterator[None]:
    """For the block, SIGHUP stops the run between paid calls instead of killing the process
    (only where signals can be set: the process's main thread), and `logger` hears what
    happened to the process."""
    _loggers.append(logger)
    previous = None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        previous = signal.signal(signal.SIGHUP, _hang_up)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)
        _loggers.remove(logger)
