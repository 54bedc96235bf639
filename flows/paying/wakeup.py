"""Waking the task that waits on a job when its callback is heard, in any process or machine.

The receiver (`flows.paying.callbacks`) posts the Prefect event `imagegen.callback.heard` on resource
`imagegen.job.<request id>`. Each worker process keeps one subscription to the Prefect server's
event stream (`/events/out`, a websocket served by every API replica; across replicas the
server's Redis messaging carries it), filtered to those events, and wakes the thread waiting on
that request id. Why events: they are already where every worker connects, they need no port
open on the workers, and the stream replays the last minute on (re)connecting, so a callback
heard while a connection was being made is not missed. A callback heard before its task waits
is kept until the task asks.

Anyone who may post events to the Prefect API can post this one. So an event is only a reason
to look, and only once confirmed: a waiter takes only events naming its own job (or no job: a
body the receiver could not read), and only those whose heard note the receiver wrote in S3
before posting the event (an event posted straight to the Prefect API has none, and costs one
S3 read, never a status request). A holder of the job's callback URL can still make the receiver
write notes; the Block then looks at most once per `callback_wake_gap` seconds however many come.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from flows.paying.callbacks import HEARD_EVENT, RESOURCE_PREFIX, UNREADABLE

CONNECT_TIMEOUT = 15.0
KEEP_HEARD = 600.0
MAX_JOBS_HEARD = 8
"""Job ids kept per request id until its task asks (events naming other jobs are forged or stale)."""
log = logging.getLogger("imagegen.wakeup")


class Listener:
    """One event-stream subscription per process, shared by every waiting thread."""

    def __init__(self) -> None:
        self._heard: dict[str, dict[str, tuple[float, str, str]]] = {}  # request id -> job id -> (when, state, body)
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self.woken: deque[str] = deque(maxlen=10_000)  # request ids whose wait a recorded callback ended, latest last
        context = contextvars.copy_context()  # the caller's Prefect settings (its API URL) go with it
        threading.Thread(target=context.run, args=(lambda: asyncio.run(self._listen()),), name="imagegen-callbacks",
                         daemon=True).start()

    async def _listen(self) -> None:
        from prefect.events.clients import PrefectEventSubscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        event_filter = EventFilter(event=EventNameFilter(name=[HEARD_EVENT]),
                                   resource=EventResourceFilter(id_prefix=[RESOURCE_PREFIX]))
        away = False  # said once per outage, not every 5 s
        while True:
            try:
                async with PrefectEventSubscriber(filter=event_filter, reconnect_on_clean_close=True) as events:
                    self._ready.set()
                    if away:
                        log.warning("the Prefect event stream is back; callbacks wake their jobs again")
                        away = False
                    async for event in events:
                        self._hear(event.resource.id.removeprefix(RESOURCE_PREFIX),
                                   event.resource.get("imagegen.job-id", ""), event.resource.get("imagegen.state", ""),
                                   event.resource.get("imagegen.body", ""))
            except Exception as exc:  # noqa: BLE001 - the stream is away: jobs fall back to polling meanwhile
                if not away:
                    log.warning("the Prefect event stream is unreachable (%s); jobs poll until it is back",
                                type(exc).__name__)
                away = True
            await asyncio.sleep(5)

    def _hear(self, request_id: str, job_id: str = "", state: str = "", digest: str = "") -> None:
        """Keep the callback until its task asks (the stream carries every process's callbacks:
        those no task here asks for are dropped after `KEEP_HEARD` seconds)."""
        now = time.monotonic()
        with self._cond:
            heard = self._heard.setdefault(request_id, {})
            heard[job_id] = (now, state, digest)
            if len(heard) > MAX_JOBS_HEARD:  # a flood of events naming other jobs: the oldest go
                del heard[min(heard, key=lambda jid: heard[jid][0])]
            if len(self._heard) > 1000:
                self._heard = {rid: jobs for rid, jobs in self._heard.items()
                               if any(now - seen[0] < KEEP_HEARD for seen in jobs.values())}
            self._cond.notify_all()

    def ready(self, timeout: float = CONNECT_TIMEOUT) -> bool:
        """True once the subscription is open (a job submitted before may miss nothing: replay)."""
        return self._ready.wait(timeout)

    def wait(self, request_id: str, seconds: float, job_id: str | None = None) -> tuple[str, str, str] | None:
        """Block until a callback of `request_id` naming `job_id` (or no job: an unreadable body;
        any job where `job_id` is None) is heard or `seconds` pass; consume it and return the job
        id, state and body digest it named, or None. Events naming another job are never taken."""
        taken: list[tuple[str, str, str]] = []

        def take() -> bool:
            heard = self._heard.get(request_id) or {}
            for jid in (tuple(heard) if job_id is None else (job_id, "")):
                if jid in heard:
                    _, state, digest = heard.pop(jid)
                    taken.append((jid, state, digest))
                    return True
            return False

        with self._cond:
            if not self._cond.wait_for(take, timeout=seconds):
                return None
            return taken[0]

    def waker(self, request_id: str, read_note: Callable[[str, str, str], Any | None]) -> JobWaker:
        return JobWaker(self, request_id, read_note)


class JobWaker:
    """A `blocks.base.Waker` for one request id; `read_note(job id, state, body digest)` reads
    the body the receiver kept of a callback (its heard note, named by the event)."""

    def __init__(self, listener: Listener, request_id: str,
                 read_note: Callable[[str, str, str], dict[str, Any] | None]) -> None:
        self.listener, self.request_id, self.read_note = listener, request_id, read_note
        self.last: tuple[str, str, str] | None = None
        self.note: dict[str, Any] | None = None
        self.unconfirmed: set[tuple[str, str, str]] = set()  # events with no heard note: read once, then ignored

    def wait(self, seconds: float, job_id: str | None = None) -> bool:
        """True once a callback the receiver recorded is heard; events it did not record (posted
        straight to the Prefect API) are passed over, and the wait goes on for the rest of `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            self.last = self.listener.wait(self.request_id, max(0.0, deadline - time.monotonic()), job_id)
            if self.last is None:
                return False
            if self.last not in self.unconfirmed:
                self.note = self.read_note(*self.last)
                if self.note is not None:
                    self.listener.woken.append(self.request_id)
                    return True
                self.unconfirmed.add(self.last)
                log.warning("a callback event for request %s names job %s, but the receiver recorded no such callback; "
                            "it is ignored (forged, or posted by hand)", self.request_id, self.last[0] or "-")

    def heard(self) -> Any | None:
        if self.last is None or self.note is None or not self.last[0] or self.last[1] == UNREADABLE:
            return None  # an unreadable body kept no job's callback to read
        return self.note.get("body")


_listener: list[Listener] = []
_lock = threading.Lock()


def listener() -> Listener:
    """The process's listener, started on first use."""
    with _lock:
        if not _listener:
            _listener.append(Listener())
        return _listener[0]
