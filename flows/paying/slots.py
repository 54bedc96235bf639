"""Slots of Prefect server limits, taken through the API client with our own waiting.

Prefect's `concurrency()` and `rate_limit()` wait as long as the server's Retry-After says,
in one queue per process that never wakes same-process waiters (PrefectHQ/prefect#23183); for
a provider cap of 1-3 jobs lasting seconds that hint is a whole job or more, so a freed slot
sits idle; and asking with `max_retries=0` to wait our own way logs an ERROR per refusal. Here:

- `take_rate(name, per_second)`: one thread per process at a time asks for a rate slot, and
  not before the limit's spacing (plus a small margin) since the last slot this process got,
  so a single process gets every slot on its first ask. A refusal does not move the limit's
  decay (the server rolls the denied-slot write back with its 423); asking early only costs
  the ~one-spacing Retry-After the refusal carries, which is the wait another process's slot
  gets here. A request that could not leave soon after its slot (`late_send_seconds` of the
  limits file) takes another (`PrefectLimiter`): late, it would crowd the next slots' requests.
- `hold(name)`: one in-flight slot on a lease, asked again every `RETRY_SECONDS` (jittered)
  while full, or as soon as a holder in this process releases one; while this process itself
  holds every slot of the cap, only then (or after `LOCAL_FULL_WAIT`): no other slot can free
  up. Renewed by one background thread per process (`flows.paying.leases`, which also tells
  when a lease is lost), released however the job ends. A release that fails is logged and
  left to the lease; it never replaces the job's outcome.
- `reclaim_expired()`: frees the slots of leases that expired (their holder died). Prefect's
  repossessor does that on `prefect server start`, but never in an ephemeral server (the
  temporary one every `imagegen run` without `PREFECT_API_URL` starts, and the test harness):
  there, with the filesystem lease storage in `PREFECT_HOME` that `flows` selects, a dead run's
  leases outlive it and are freed here, by whichever run waits for the slot next. Only there
  (`reclaim_here`): never beside a real server's repossessor.

The limits themselves are the server's: every slot is granted by it, so they hold across
processes and machines. A missing limit is an error (strict), never a silent pass; an API
fault while taking a slot is a `LimiterError` (nothing was sent), never a provider error.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx

from blocks.base import retry_after_seconds
from blocks.errors import LimiterError
from flows.paying.limits import LEASE_SECONDS, LimitsFile, ProviderLimits, jobs_name, load_limits, rate_name
from flows.paying import paidcalls, slotapi
from flows.paying.leases import Lease, renewer

RETRY_SECONDS = 0.25  # how often a waiter asks again for a full in-flight cap
LOCAL_FULL_WAIT = 2.0  # ... and while this process holds the whole cap (a lost lease or a raised limit may free one)
WAIT_NOTE_SECONDS = 30.0  # how often a long wait is told again (`hold`'s on_wait)
PACING_MARGIN = 0.025  # seconds added to a rate limit's spacing (see `take_rate`)
API_ATTEMPTS = 4  # attempts of one slot call through API faults before it is a LimiterError
RECLAIM_EVERY = 2.0  # seconds between two looks for expired leases while a waiter waits
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
LATE_RETAKES = 3  # late rate slots let pass before a request goes anyway (a starved process)


class LimitMissing(RuntimeError):
    """The limit does not exist on the Prefect server (run `imagegen limits apply`)."""


class LeaseSettingInvalid(ValueError):
    """`IMAGEGEN_LEASE_SECONDS` is not a number of seconds."""


_client_lock = threading.Lock()
_client: Any = None


def api_client() -> Any:
    """One open sync Prefect client for the process (its httpx client is thread-safe)."""
    global _client
    with _client_lock:
        if _client is None:
            from prefect.client.orchestration import get_client

            client = get_client(sync_client=True)
            client.__enter__()
            _client = client
        return _client


def _post(path: str, body: dict[str, Any], through_prefect: Callable[[Any], Any]) -> Any:
    """A slot call sent directly (`flows.paying.slotapi`), or through Prefect's client where the
    direct path cannot tell."""
    client = api_client()
    answer = slotapi.post(client, path, body)
    return answer if answer is not None else through_prefect(client)


def _slot_call(what: str, call: Callable[[], Any]) -> Any:
    """One slot call through the API, retried through API faults; a 423 (full) is returned to
    the caller as the `HTTPStatusError` it is; anything else that persists is a `LimiterError`."""
    for attempt in range(API_ATTEMPTS):
        try:
            return call()
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            if code == 423 or (code < 500 and code != 429):
                raise
            error: Exception = exc
        except httpx.HTTPError as exc:  # timeouts, refused connections: the API, not the provider
            error = exc
        if attempt + 1 < API_ATTEMPTS:
            time.sleep(min(4.0, 0.25 * 2**attempt) * random.uniform(0.8, 1.2))
    raise LimiterError(f"{what}: the Prefect API did not answer ({type(error).__name__}); nothing was sent "
                       "to the provider") from None


def _locked(exc: httpx.HTTPStatusError) -> float | None:
    """The Retry-After of a 423 (limit full), or None for any other refusal."""
    if exc.response.status_code != 423:
        return None
    wait = retry_after_seconds(exc.response)
    return RETRY_SECONDS if wait is None else wait


class _Pacer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_at = 0.0
        self.answered = threading.Event()
        self.answered.set()


_pacers: dict[str, _Pacer] = {}
_pacers_lock = threading.Lock()


@dataclass(frozen=True)
class RateSlot:
    """A rate slot this process got: when its grant arrived, and the function to call once the
    request it was for is answered (or will not be sent)."""

    got_at: float
    answered: Callable[[], None]


def take_rate(name: str, per_second: float) -> RateSlot:
    """Block until the rate limit `name` (decaying `per_second`) grants this process a slot;
    return it, to be `answered` once the request it was for is.

    The next slot is not asked for before that answer (or two spacings, if it never comes):
    a thread held up between its slot and its send (a busy process) would otherwise send
    late, right beside the next one, and two arrivals that close can exceed the provider's
    count over a sliding second even though the slots were spaced."""
    with _pacers_lock:
        pacer = _pacers.setdefault(name, _Pacer())
    spacing = 1.0 / per_second
    with pacer.lock:
        pacer.answered.wait(2 * spacing)
        while True:
            time.sleep(max(0.0, pacer.next_at - time.monotonic()))
            asked = time.monotonic()
            try:
                answer = _slot_call(f"rate slot {name}",
                                    lambda: _post("/v2/concurrency_limits/increment",
                                                  {"names": [name], "slots": 1, "mode": "rate_limit"},
                                                  lambda client: client.increment_concurrency_slots(
                                                      [name], 1, "rate_limit")))
            except httpx.HTTPStatusError as exc:
                wait = _locked(exc)
                if wait is None:
                    raise LimiterError(f"rate slot {name}: HTTP {exc.response.status_code} from the Prefect "
                                       "API") from None
                pacer.next_at = time.monotonic() + min(wait, spacing)  # another process took it
                continue
            if not answer.json():
                raise LimitMissing(f"rate limit {name!r} does not exist on the Prefect server; "
                                   "run `imagegen limits apply`")
            # The slot decays from when the server took it, a little after we asked; asking too
            # early costs the refusal's Retry-After (about a spacing).
            pacer.next_at = asked + spacing + PACING_MARGIN
            pacer.answered.clear()
            return RateSlot(time.monotonic(), pacer.answered.set)


def _holder() -> Any:
    """The task run holding the slot, shown with the lease on the server, if in one."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ConcurrencyLeaseHolder(type="task_run", id=ctx.task_run.id) if ctx else None


class _Holders:
    """This process's holders of one limit: how many slots they hold, how many they have
    released so far, and a condition notified at each release."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.held = 0
        self.releases = 0

    def wait_for_release(self, seen: int, cap: int | None) -> None:
        """Wait until a release after the `seen`-th one, at most `LOCAL_FULL_WAIT` while this
        process holds the whole `cap` (only its own release can free a slot), else
        `RETRY_SECONDS` (a holder elsewhere may release meanwhile)."""
        with self.changed:
            whole_cap_here = cap is not None and self.held >= cap
            timeout = LOCAL_FULL_WAIT if whole_cap_here else RETRY_SECONDS * random.uniform(0.75, 1.25)
            self.changed.wait_for(lambda: self.releases != seen, timeout)


_holders: dict[str, _Holders] = {}


def configured_lease(default: float) -> float:
    """The lease of held slots: `IMAGEGEN_LEASE_SECONDS` if set, else `default`, within Prefect's
    bounds (60 s to a day). A holder that dies frees its slots at most this long after its last
    renewal (renewals come every third of it)."""
    value = os.environ.get("IMAGEGEN_LEASE_SECONDS", "").strip()
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = float("nan")
    if math.isnan(seconds):  # not a number (also "nan" itself)
        raise LeaseSettingInvalid(f"IMAGEGEN_LEASE_SECONDS={value!r} is not a number of seconds: set 60 to 86400, "
                                  f"or unset it for the default of {default:.0f}")
    return min(86400.0, max(60.0, seconds))


_reclaimed_at = [0.0]
_reclaim_lock = threading.Lock()


def reclaim_here() -> bool:
    """Whether this process frees expired leases itself: only with the filesystem lease storage
    and where no repossessor runs, i.e. an ephemeral server (no `PREFECT_API_URL`).
    `IMAGEGEN_RECLAIM_LEASES=1` says so for an ephemeral server reached by URL (the test
    harness); `0` turns it off. Never beside a real server's repossessor: two that free the
    same expired lease at once could count its slot free twice."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.server.concurrency.lease_storage != FILESYSTEM_LEASES:
        return False
    flag = os.environ.get("IMAGEGEN_RECLAIM_LEASES")
    return flag == "1" if flag is not None else settings.api.url is None


def reclaim_expired(force: bool = False) -> int:
    """Free the slots of expired leases kept in this machine's filesystem lease storage (see
    the module docstring and `reclaim_here`); returns how many were freed. At most one look
    every `RECLAIM_EVERY` s per process, and one process at a time (a file lock)."""
    if not reclaim_here():
        return 0
    with _reclaim_lock:
        if not force and time.monotonic() - _reclaimed_at[0] < RECLAIM_EVERY:
            return 0
        _reclaimed_at[0] = time.monotonic()
    import fcntl

    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage
    from prefect.utilities.asyncutils import run_coro_as_sync

    storage = ConcurrencyLeaseStorage()
    if not storage.storage_path.exists():
        return 0
    freed = 0
    with open(storage.storage_path / ".imagegen-reclaim.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process of ours may be freeing the same leases
        for lease_id in run_coro_as_sync(storage.read_expired_lease_ids(limit=1000)) or []:
            try:
                api_client().release_concurrency_slots_with_lease(lease_id)
                freed += 1
            except httpx.HTTPError:
                continue  # the API is busy: the next look retries
    if freed:
        from prefect.logging import get_logger

        get_logger("imagegen.slots").warning("freed the slots of %d expired lease(s) whose holder had died", freed)
    return freed


@contextlib.contextmanager
def hold(name: str, lease_seconds: float, holder: Any = None,
         on_wait: Callable[[float], None] | None = None, cap: int | None = None) -> Iterator[Lease]:
    """Hold one slot of the concurrency limit `name` for the duration of the block, on the
    `Lease` it yields (renewed meanwhile; see `flows.paying.leases` for when it counts as lost).

    While the limit is full, ask again when a holder in this process releases a slot, or
    after `RETRY_SECONDS` (a holder elsewhere may have released one, or died: expired leases
    are reclaimed meanwhile), or after `LOCAL_FULL_WAIT` while holders in this process hold
    all `cap` slots (the limit's declared size). `on_wait(seconds waited)` runs when the first ask
    is refused, then every `WAIT_NOTE_SECONDS` while refusals go on. `holder` (default: the
    current task run) is shown with the lease on the server. Once the process is asked to stop
    (`paidcalls.request_stop`), a full limit is not waited for (`RunStopping`), except by a
    thread collecting a job already paid for (`paidcalls.collecting`)."""
    holder = holder if holder is not None else _holder()
    with _pacers_lock:
        here = _holders.setdefault(name, _Holders())
    told: float | None = None  # when on_wait last ran
    first_refused: float | None = None
    while True:
        with here.changed:
            seen = here.releases
        asked = time.monotonic()
        try:
            answer = _slot_call(f"slot of {name}", lambda: _post(
                "/v2/concurrency_limits/increment-with-lease",
                {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": lease_seconds}
                | ({"holder": holder.model_dump(mode="json")} if holder is not None else {}),
                lambda client: client.increment_concurrency_slots_with_lease(
                    [name], 1, "concurrency", lease_seconds, holder)))
        except httpx.HTTPStatusError as exc:
            if _locked(exc) is None:
                raise LimiterError(f"slot of {name}: HTTP {exc.response.status_code} from the Prefect API") from None
            if (why := paidcalls.stops_waiting()) is not None:  # Ctrl-C, SIGHUP: no wait for what it would pay
                raise paidcalls.RunStopping(f"{why}: stopped while waiting for a slot of {name}; nothing was sent")
            now = time.monotonic()
            first_refused = now if first_refused is None else first_refused
            if on_wait is not None and (told is None or now - told >= WAIT_NOTE_SECONDS):
                on_wait(now - first_refused)
                told = now
            reclaim_expired()
            here.wait_for_release(seen, cap)
            continue
        body = answer.json()
        if not body.get("limits"):
            raise LimitMissing(f"concurrency limit {name!r} does not exist on the Prefect server; "
                               "run `imagegen limits apply`")
        lease = Lease(UUID(body["lease_id"]), name, lease_seconds, confirmed=asked)
        with here.changed:
            here.held += 1
        break
    renewer.add(lease)
    try:
        yield lease
    finally:
        renewer.remove(lease)
        try:  # a lost lease too: the server may still count its slot (a no-op where it was freed)
            _slot_call(f"release of {name}", lambda: _post(
                "/v2/concurrency_limits/decrement-with-lease", {"lease_id": str(lease.id)},
                lambda client: client.release_concurrency_slots_with_lease(lease.id)))
        except Exception as exc:  # noqa: BLE001 - the lease frees it; the job's own outcome stands
            from prefect.logging import get_logger

            get_logger("imagegen.slots").warning("could not release slot of %s (%s); it frees itself when its "
                                                 "lease expires", name, exc)
        with here.changed:
            here.held -= 1
            here.releases += 1
            here.changed.notify()


def _checked(slot: RateSlot) -> RateSlot:
    """`slot`, once `paidcalls.check_armed` let its request go (answered at once if not)."""
    try:
        paidcalls.check_armed()
    except BaseException:
        slot.answered()
        raise
    return slot


class PrefectLimiter:
    """Takes a provider account's limits from the Prefect server, strictly (missing = error).

    Rate slots are paced at the rate `limits.yaml` declares (times `rate_safety`), the same
    decay `apply_limits` sets on the server; see this module for how slots are asked for
    and held."""

    def __init__(self, provider: str, block: str, limits: LimitsFile | None = None) -> None:
        self.provider, self.block = provider, block
        self.limits = limits or load_limits()
        self.declared = self.limits.providers.get(provider, ProviderLimits())

    def rate_action(self, action: str) -> str | None:
        """The rate an action counts against: its own, else the account-wide `api` one."""
        return action if action in self.declared.rate else ("api" if "api" in self.declared.rate else None)

    @contextlib.contextmanager
    def request(self, action: str) -> Iterator[None]:
        """A rate slot for one request, held until it is answered (see `slots.take_rate`)."""
        key = self.rate_action(action)
        if key is None:
            paidcalls.check_armed()
            yield
            return
        slot = self._timely_rate_slot(key)
        try:
            yield
        finally:
            slot.answered()

    def _timely_rate_slot(self, key: str) -> RateSlot:
        """A rate slot for a request that leaves now. The request waited for its slot, so a paid
        call's is checked again (is the run's claim still its own?); and one held up longer than
        `late_send_seconds` after its grant arrived (that check waited on a lease in doubt, or
        the thread was not scheduled) lets that slot pass unused and takes another: sent late, it
        would reach the provider in the same second as the requests of slots granted after it.
        After `LATE_RETAKES` the request goes anyway: a starved process must still progress.

        Lateness before the grant arrives is not seen here: the server's slot time is its
        transaction's start (PostgreSQL's `now()`), and a busy server answers later than that.
        Measured from the ask, under load (three workers and two busy loops on two cores) the
        slot call took a median 61 ms and 212 ms at the 90th percentile, so most slots would
        be retaken; from the answer to the check, 0.1 ms. The rest falls to the rate margin, and
        on a machine that loaded a rare request may still be refused (README, "Rates are spaced")."""
        name, per_second = rate_name(self.provider, self.block, key), self.limits.applied_rate(self.declared.rate[key])
        late = self.limits.late_send_seconds
        for _ in range(LATE_RETAKES):
            slot = _checked(take_rate(name, per_second))
            if late is None or time.monotonic() - slot.got_at <= late:
                return slot
            slot.answered()
        return _checked(take_rate(name, per_second))

    def job_cap(self, action: str) -> tuple[str, int] | None:
        """The declared in-flight cap an action counts against, and its size."""
        key = action if action in self.declared.jobs else ("default" if "default" in self.declared.jobs else None)
        return (key, self.declared.jobs[key]) if key is not None else None

    @contextlib.contextmanager
    def job(self, action: str) -> Iterator[None]:
        """Hold one in-flight slot on the server for the whole job (a lease renewed while held;
        a paid call of the job is not sent once it is lost, see `flows.paying.paidcalls`)."""
        cap = self.job_cap(action)
        if cap is None:
            yield
            return
        with hold(jobs_name(self.provider, self.block, cap[0]), configured_lease(LEASE_SECONDS), cap=cap[1]) as lease, \
                paidcalls.job_slot(lease):
            yield

