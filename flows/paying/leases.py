"""The leases this process holds on Prefect limits: renewed in the background, failing closed.

Every slot `flows.paying.slots.hold` takes (a provider job slot, a run's claim) is held on a lease
that the Prefect server frees when it is not renewed in time. `Renewer` renews each one every
third of its duration, and each `Lease` knows whether it is still surely this process's:

- **held**: its grant or last renewal was answered less than half its duration ago;
- **in doubt**: its renewals fail (the API does not answer), or are late: a paid call waits;
- **lost**, for good: the server answered that it no longer has it (HTTP 404/410), or no
  renewal was answered for its whole duration, so it may have expired on the server and its
  slot been given to another holder (a second run of the same date). A lost lease is never
  renewed again; its slot is left to expire on the server.

Renewals go through a client of their own, without Prefect's client retries and with a short
timeout: Prefect's client retries a server that went away for about a minute per call, which
would hide a lease's expiry behind one stuck renewal.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import httpx

RETRY_FAILING = 2.0  # seconds between renewals of a lease whose last renewal failed
SURE_FOR = 0.5  # share of its duration a lease is surely held after an answered renewal
RENEW_TIMEOUT = 10.0  # seconds one renewal may take
TICK = 0.5  # how often the renewer looks at its leases


class LeaseState(enum.Enum):
    HELD = "held"
    IN_DOUBT = "in doubt"
    LOST = "lost"


@dataclass(eq=False)
class Lease:
    """One lease on a limit's slot, as this process last knew it (times are `time.monotonic`)."""

    id: UUID
    name: str
    duration: float
    confirmed: float = field(default_factory=time.monotonic)  # when its last answered grant/renewal was sent
    failing: str | None = None  # why its renewals fail since then
    lost: str | None = None  # why it is lost (for good)
    on_lost: list[Callable[[Lease], None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def state(self, now: float | None = None) -> LeaseState:
        """Held, in doubt or lost; finds it lost once its duration passed unrenewed."""
        age = (time.monotonic() if now is None else now) - self.confirmed
        if self.lost is None and age >= self.duration:
            self.lose(f"no renewal of its {self.duration:.0f} s lease was answered for {age:.0f} s "
                      f"({self.failing or 'none was sent'}), so it expired on the Prefect server")
        if self.lost is not None:
            return LeaseState.LOST
        return LeaseState.IN_DOUBT if self.failing or age > self.duration * SURE_FOR else LeaseState.HELD

    def renewed(self, sent: float) -> None:
        """A renewal sent at `sent` was answered."""
        with self.lock:
            if self.lost is None:
                self.confirmed, self.failing = max(self.confirmed, sent), None

    def failed(self, why: str) -> bool:
        """A renewal failed; True when it is the first since the last answered one."""
        with self.lock:
            first, self.failing = self.failing is None, why
        return first

    def lose(self, why: str) -> None:
        """Lost for good; each `on_lost` callback hears it once."""
        with self.lock:
            if self.lost is not None:
                return
            self.lost = why
            callbacks = list(self.on_lost)
        for callback in callbacks:
            callback(self)

    def left(self, now: float | None = None) -> float:
        """Seconds until it expires on the server at the latest, unless renewed."""
        return self.confirmed + self.duration - (time.monotonic() if now is None else now)


def _log() -> Any:
    from prefect.logging import get_logger

    return get_logger("imagegen.leases")


class Renewer:
    """Renews this process's leases: each every third of its duration, and every
    `RETRY_FAILING` s while its renewals fail; a lease found lost is dropped."""

    def __init__(self) -> None:
        self.due: dict[Lease, float] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.client: Any = None

    def add(self, lease: Lease) -> None:
        with self.lock:
            if self.client is None:  # made in the holder's thread, within its Prefect settings
                from prefect.client.orchestration import get_client

                self.client = get_client(sync_client=True, httpx_settings={"timeout": RENEW_TIMEOUT})
                self.client.__enter__()
            self.due[lease] = lease.confirmed + lease.duration / 3
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="imagegen-lease-renewer", daemon=True)
                self.thread.start()

    def remove(self, lease: Lease) -> None:
        with self.lock:
            self.due.pop(lease, None)

    def _run(self) -> None:
        while True:
            with self.lock:
                due = dict(self.due)
            for lease, at in due.items():
                if lease.state() is LeaseState.LOST:
                    self.remove(lease)
                elif time.monotonic() >= at:
                    self._renew(lease)
                    with self.lock:
                        if lease in self.due:
                            self.due[lease] = time.monotonic() + (
                                RETRY_FAILING if lease.failing else lease.duration / 3)
            time.sleep(TICK)

    def _renew(self, lease: Lease) -> None:
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        sent = time.monotonic()
        try:
            with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
                self.client.renew_concurrency_lease(lease.id, lease.duration)
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            with self.lock:
                released = lease not in self.due  # let go meanwhile (`remove` comes before the release)
            if released:
                return  # not lost: a run that ended would log its claim lost after its end
            if code in (404, 410):
                lease.lose(f"the Prefect server no longer has its lease (HTTP {code}): it expired or was revoked")
                return
            self._failed(lease, f"HTTP {code}")
            return
        except Exception as exc:  # noqa: BLE001 - a renewal that failed is the lease in doubt
            self._failed(lease, type(exc).__name__)
            return
        if lease.failing is not None:
            _log().warning("renewed the lease of %s again", lease.name)
        lease.renewed(sent)

    @staticmethod
    def _failed(lease: Lease, why: str) -> None:
        if lease.failed(f"the Prefect API did not renew it: {why}"):
            _log().warning("could not renew the lease of %s (%s); paid calls wait until it is renewed, and stop "
                           "for good if it is not within %.0f s", lease.name, why, max(0.0, lease.left()))


renewer = Renewer()
