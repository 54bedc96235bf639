"""Fail closed: a paid call starts only while its run surely holds its claim and job slot.

The run's claim (`flows.paying.claim`) and a job's in-flight slot (`flows.paying.slots`) are leases on the
Prefect server (`flows.paying.leases`). While the server is away they cannot be renewed, and once
away longer than a lease they may be someone else's: a second run of the same date can get
the claim and pay for the same items. So a paid call is checked twice: `begin` right before
it is recorded `sending` (`flows.paying.journal.ItemJournal.sending`), and `check_armed` once each of
its requests got its rate slot, right before it goes on the wire (a rate slot can wait out an
outage). It raises a `PaidCallRefused` (nothing was sent; never retried) when

- the run's claim is lost (`ClaimLost`), or this job's slot is (`JobSlotLost`);
- the process was asked to stop between paid calls (`RunStopping`, see `flows.paying.detach`).

While a lease is in doubt (its renewals fail, not yet expired) the call waits: it goes on if
the lease is renewed in time and is refused if not. Calls already sent are recorded as usual,
and jobs already paid for are polled to the end: only new paid calls stop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from flows.paying.leases import Lease, LeaseState

WAIT_STEP = 0.25  # seconds between two looks at a lease in doubt


class PaidCallRefused(RuntimeError):
    """No paid call may start now; nothing was sent for this one."""


class ClaimLost(PaidCallRefused):
    """The run's claim on its pipeline and date is lost: another run may hold it now."""


class JobSlotLost(PaidCallRefused):
    """The job's in-flight slot is lost: the provider's cap may be someone else's now."""


class RunStopping(PaidCallRefused):
    """The process was asked to stop (SIGHUP): it stops between paid calls."""


_claims: dict[str, Lease] = {}
_ended: dict[str, str] = {}  # flow runs of this process that stopped (`end_run`, the claim let go): why
_local = threading.local()
_stop: list[str] = []


def _key(run_id: Any) -> str:
    return str(run_id) if run_id else ""


@contextlib.contextmanager
def claim(run_id: Any, lease: Lease) -> Iterator[None]:
    """`lease` is the claim of flow run `run_id` for the block. Once the block is left, no
    paid call of the run starts in this process (`RunStopping`): a task still running after its
    run stopped on an error would pay with no claim held, past a budget already closed."""
    key = _key(run_id)
    _claims[key] = lease
    _ended.pop(key, None)
    try:
        yield
    finally:
        _claims.pop(key, None)
        if key:
            _ended.setdefault(key, "its run has ended")


def end_run(run_id: Any, why: str) -> None:
    """Flow run `run_id` stops (`why`): none of its paid calls starts from now on in this process;
    its jobs already paid for are polled to the end."""
    if key := _key(run_id):
        _ended[key] = why


_running: dict[str, None] = {}  # the flow runs of this process in progress, claim or not yet


@contextlib.contextmanager
def running(run_id: Any) -> Iterator[None]:
    """Flow run `run_id` is in progress in this process for the block (`runs_in_progress`)."""
    _running[_key(run_id)] = None
    try:
        yield
    finally:
        _running.pop(_key(run_id), None)


def runs_in_progress() -> list[str]:
    """The flow runs of this process in progress now: started, whether or not they hold their
    claim yet (a backfill's date started just before a second Ctrl-C was left Running)."""
    return [run for run in list(_running) if run]


def claim_lost(run_id: Any) -> str | None:
    """Why the claim of flow run `run_id` is lost, or None (held, or no claim at all)."""
    lease = _claims.get(_key(run_id))
    return lease.lost if lease is not None and lease.state() is LeaseState.LOST else None


def lost_claim_message(lease: Lease) -> str:
    """What a lost claim means, in one line."""
    return (f"the claim {lease.name} is lost: {lease.lost}. Another run of this date may hold it now, so this run "
            "starts no more paid calls; jobs already paid for are polled to the end")


@contextlib.contextmanager
def job_slot(lease: Lease) -> Iterator[None]:
    """`lease` is the in-flight slot of the job this thread runs, for the block."""
    slots: list[Lease] = _local.__dict__.setdefault("slots", [])
    slots.append(lease)
    try:
        yield
    finally:
        slots.remove(lease)


def request_stop(why: str) -> None:
    """No paid call starts in this process from now on (`RunStopping`)."""
    if not _stop:
        _stop.append(why)


def stop_requested() -> str | None:
    return _stop[0] if _stop else None


@contextlib.contextmanager
def collecting(paid: bool = True) -> Iterator[None]:
    """With `paid`, this thread collects a job already paid for (a resumed job) in the block: a
    stop does not end its waits (`stops_waiting`), since jobs paid for are polled to the end."""
    before = _local.__dict__.get("collecting", False)
    _local.collecting = before or paid
    try:
        yield
    finally:
        _local.collecting = before


def stops_waiting() -> str | None:
    """Why a wait of this thread for a full limit ends now (a stop was asked and the wait is
    for something that would pay), or None."""
    return None if _local.__dict__.get("collecting") else stop_requested()


def _sure(lease: Lease) -> bool:
    """Wait while `lease` is in doubt; True when held, False when lost."""
    while (state := lease.state()) is LeaseState.IN_DOUBT and not _stop:
        time.sleep(WAIT_STEP)
    return state is LeaseState.HELD


def check(run_id: Any) -> None:
    """Raise a `PaidCallRefused` unless flow run `run_id` (None: no run) may start a paid call
    now; wait while its claim or this thread's job slot is in doubt."""
    if (ended := _ended.get(_key(run_id))) is not None:
        raise RunStopping(f"{ended}: not sent, nothing paid; the next run sends it")
    claimed = _claims.get(_key(run_id))
    if claimed is not None and not _sure(claimed) and claimed.lost:
        raise ClaimLost(lost_claim_message(claimed) + " (nothing was sent for this one)")
    for slot in list(_local.__dict__.get("slots", [])):
        if not _sure(slot) and slot.lost:
            raise JobSlotLost(f"the job slot {slot.name} is lost: {slot.lost}; its provider's cap may be another "
                              "holder's now, so this paid call is not sent")
    if (why := stop_requested()) is not None:
        raise RunStopping(f"{why}: not sent, nothing paid; the next run sends it")  # the run's log says the rest


def ensure_claim(run_id: Any) -> None:
    """Raise `ClaimLost` if flow run `run_id`'s claim is lost (waiting while it is in doubt):
    before a run takes over what another run left in the ledger."""
    claimed = _claims.get(_key(run_id))
    if claimed is not None and not _sure(claimed) and claimed.lost:
        raise ClaimLost(lost_claim_message(claimed))


def begin(run_id: Any) -> None:
    """A paid call of flow run `run_id` is about to be recorded `sending`: check, then arm
    `check_armed` for its requests until `end`, and count it in flight until `recorded`."""
    check(run_id)
    _local.armed = (run_id,)
    key = _key(run_id)
    if key and _local.__dict__.get("in_flight") is None:  # a step's second call is still its one
        with _in_flight_changed:
            _in_flight[key] = _in_flight.get(key, 0) + 1
        _local.in_flight = key


_in_flight: dict[str, int] = {}  # per flow run: its paid calls whose ledger record still says `sending`
_in_flight_changed = threading.Condition()


def recorded() -> None:
    """This thread's paid call has a record past `sending` in S3 (or its step gave up writing
    one): a run that stops no longer needs to wait for it before letting its claim go."""
    key = _local.__dict__.get("in_flight")
    if key is None:
        return
    _local.in_flight = None
    with _in_flight_changed:
        if (left := _in_flight.get(key, 0) - 1) > 0:
            _in_flight[key] = left
        else:
            _in_flight.pop(key, None)
        _in_flight_changed.notify_all()


def wait_recorded(run_id: Any, patience: float, tell: Any = None) -> int:
    """Wait, at most `patience` seconds, until no paid call of flow run `run_id` is between its
    `sending` record and the next (`tell(n)` once, with how many there are, if any). Returns
    how many are left. A run that stops on an error waits here before letting its claim go: a
    second run of the date let in now would take such a record, whose answer is on its way
    to this process, for a call lost with its run."""
    key, deadline, told = _key(run_id), time.monotonic() + patience, False
    with _in_flight_changed:
        while (left := _in_flight.get(key, 0)) and (wait := deadline - time.monotonic()) > 0:
            if not told and tell is not None:
                told = True
                tell(left)
            _in_flight_changed.wait(min(wait, 1.0))
        return left


def wait_all_recorded(patience: float, tell: Any = None) -> int:
    """`wait_recorded` for every flow run of this process (a backfill's dates), `patience`
    seconds in all; how many paid calls are left between `sending` and the next record."""
    deadline = time.monotonic() + patience
    with _in_flight_changed:
        runs = list(_in_flight)
    return sum(wait_recorded(run, max(0.0, deadline - time.monotonic()), tell) for run in runs)


def end() -> None:
    """The paid call was answered (or never sent): its requests are no longer checked."""
    _local.armed = None


def check_armed() -> None:
    """A request of this thread got its rate slot: if it belongs to a paid call, check again
    right before it is sent."""
    armed = _local.__dict__.get("armed")
    if armed is not None:
        check(armed[0])
