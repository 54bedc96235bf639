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

Ctrl-C in the terminal of `imagegen run` or `backfill` (`stop_on_interrupt`) does the same, and
says so on the terminal; a second Ctrl-C leaves at once, as a killed process does (every paid
call is in the ledger before it is sent: the next run of the date collects what was paid,
without paying again), after telling the Prefect API the run crashed (3 s at most).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from flows.paying import paidcalls, stalled

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


LEAVE_REPORT_SECONDS = 3.0  # how long a second Ctrl-C waits for the API to hear that the run crashed
INTERRUPTED = 130  # the exit status of a process ended by Ctrl-C (128 + SIGINT)

FIRST_CTRL_C = ("\nCtrl-C: stopping. No new paid call starts; jobs already paid for are collected and archived, "
                "then the run ends. Ctrl-C again to leave at once: the next run of the same date collects those "
                "jobs without paying again.\n")
SECOND_CTRL_C = ("\nCtrl-C again: leaving now. Every paid call is in the ledger: run the same command again to "
                 "collect what was paid (nothing is paid twice; it may first wait for this run's claim to expire, "
                 "{lease} after its last renewal).\n")

SECOND_CTRL_C_HELD = ("\nCtrl-C again: leaving now, while S3 had not taken a paid answer this run holds ({what}): it "
                      "is lost with this process. The next run of the date stops that item for a person "
                      "(`imagegen ledger resolve`); every other paid call is in the ledger.\n")


def _lease() -> str:
    """The claim's lease, as the second Ctrl-C's line says it."""
    from flows.paying.limits import LEASE_SECONDS
    from flows.paying.slots import configured_lease

    try:
        return f"at most {configured_lease(LEASE_SECONDS):.0f} s"
    except ValueError:
        return "at most one lease"


def _say(text: str) -> None:
    """Write to the terminal from a signal handler: straight to the file descriptor, taking no
    lock that the interrupted code may hold (logging's, rich's)."""
    with contextlib.suppress(OSError):
        os.write(sys.__stderr__.fileno() if sys.__stderr__ else 2, text.encode())


def _report_crash(run_ids: list[Any]) -> None:
    """Tell the Prefect API that the flow runs `run_ids` crashed and send the logs not sent yet
    (best effort, `LEAVE_REPORT_SECONDS` at most)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    def report() -> None:
        from prefect.logging.handlers import APILogWorker

        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            crash(client, run_ids)  # first, before any read that could fail
            crash(client, _not_ended(client, run_ids))  # their subflows: the runs themselves have ended now
        with contextlib.suppress(Exception):
            APILogWorker.drain_all(timeout=LEAVE_REPORT_SECONDS - 1)  # the run's last lines, on its page in the UI
        # Once more: a date's run the engine was starting meanwhile (the API lets Running follow
        # Crashed) would be left Running for good.
        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            crash(client, _not_ended(client, [*run_ids, *paidcalls.runs_in_progress()]))

    def crash(client: Any, ids: list[Any]) -> None:
        for run_id in ids:
            client.set_flow_run_state(run_id, Crashed(message=CRASHED), force=True)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    thread.join(LEAVE_REPORT_SECONDS + 1)


def _not_ended(client: Any, run_ids: list[Any]) -> list[str]:
    """The runs `run_ids` and their subflow runs that the API knows and that have not ended: a
    backfill's date whose run the engine had created but whose body had not yet started (so not
    yet in `paidcalls.runs_in_progress`) was left Running."""
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    ids = [UUID(str(run)) for run in dict.fromkeys(str(run) for run in run_ids)]
    runs = [*client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))),
            *client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids)))]
    return list(dict.fromkeys(str(run.id) for run in runs if not (run.state and run.state.is_final())))


CRASHED = ("interrupted twice (Ctrl-C): left at once; every paid call is in the ledger, and a rerun of the same "
           "date collects what was paid without paying again")


def _runs_in_progress() -> list[Any]:
    """The flow run the main thread is in (a run, or a backfill), then every run of this
    process in progress (a backfill's dates)."""
    runs: list[Any] = []
    with contextlib.suppress(Exception):
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context and context.flow_run:
            runs.append(str(context.flow_run.id))
    return runs + [run for run in paidcalls.runs_in_progress() if run not in runs]


_interrupted: list[bool] = []


def _interrupt(signum: int, frame: Any) -> None:
    if not _interrupted:
        _interrupted.append(True)
        paidcalls.request_stop("Ctrl-C")
        _say(FIRST_CTRL_C)
        _later("Ctrl-C: this run starts no more paid calls; jobs already paid for are polled to the end, then it ends")
        return
    held = stalled.held()
    _say(SECOND_CTRL_C.format(lease=_lease()) if not held else SECOND_CTRL_C_HELD.format(what="; ".join(held)))
    if runs := _runs_in_progress():
        _report_crash(runs)
    os._exit(INTERRUPTED)


TERM_AGAIN = ("\nSIGTERM again: still waiting, at most {patience:.0f} s, for the answers of paid calls already sent "
              "to be recorded; SIGKILL leaves at once, leaving them for a person to settle (`imagegen ledger show`)\n")


@contextlib.contextmanager
def sigterm_held(patience: float) -> Iterator[None]:
    """For the block, in the main thread (elsewhere nothing changes), a SIGTERM is told, not
    acted on: a run told to stop waits there for the answers of its paid calls already sent,
    which a second SIGTERM left `sending` (Prefect's handler ends the process). SIGKILL still
    ends it at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _say(TERM_AGAIN.format(patience=patience)))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted() -> bool:
    """True once a Ctrl-C stopped this process's run (`stop_on_interrupt`)."""
    return bool(_interrupted)


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """For the block (a command's run, in the main thread), Ctrl-C stops the run between paid
    calls and a second one leaves at once (see the module)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
