"""The run's budget on what the providers charge, not only on what they quoted.

A run's `run.max_credits` caps each provider's credits. The plan is checked against the
estimates before anything is paid (`flows.pipeline`); this module holds the cap while the run
pays:

- before each paid call (a submit, a paid upscale) its cost is *reserved*: the estimate,
  scaled up by the worst charge-to-estimate ratio this provider showed in this run. A call
  whose reservation does not fit beside what was charged and reserved is not made:
  `BudgetReached`;
- the reservation is *settled* with what the provider reports it charged (触站AI's `used`),
  or kept as it is where the provider reports nothing (the estimate stands);
- a refused call (nothing was created) gives its reservation back; an unknown one keeps it.

Calls of one provider reserve, send and settle one at a time (a lock held from the
reservation to the submit's answer), so a price that rose is seen before the next call is
made: the cap can be passed by at most one call's difference between its quote and its
charge, never by a whole wave of parallel submits.

One `RunBudget` per flow run, found by the tasks (threads of the flow-run process) through
`for_run(flow_run_id)`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class BudgetReached(RuntimeError):
    """A paid call was not made: its reservation does not fit under the provider's cap."""

    def __init__(self, provider: str, cap: float, charged: float, reserved: float, cost: float) -> None:
        super().__init__(f"budget reached: run.max_credits for {provider} is {cap:g}; {charged:g} charged and "
                         f"{reserved:g} reserved, and the next call would reserve {cost:g}")
        self.provider = provider


@dataclass
class Reservation:
    """One paid call's hold on the budget, until it is settled or given back."""

    provider: str
    estimate: float
    amount: float
    settled: bool = False
    sending: bool = True  # it holds the provider's send lock


@dataclass
class ProviderSpend:
    cap: float | None
    charged: float = 0.0
    reserved: float = 0.0
    ratio: float = 1.0  # the worst charge / estimate seen in this run
    lock: threading.Lock = field(default_factory=threading.Lock)


class RunBudget:
    """Charged and reserved credits per provider, against the run's caps."""

    def __init__(self, caps: dict[str, float]) -> None:
        self._caps = dict(caps)
        self._spend: dict[str, ProviderSpend] = {}
        self._guard = threading.RLock()

    def _of(self, provider: str) -> ProviderSpend:
        with self._guard:
            return self._spend.setdefault(provider, ProviderSpend(self._caps.get(provider)))

    def reserve(self, provider: str, estimate: float) -> Reservation:
        """Hold `estimate` (scaled by the provider's worst ratio) and the provider's send lock;
        `BudgetReached` (the lock released) when it does not fit under the cap."""
        spend = self._of(provider)
        spend.lock.acquire()
        amount = estimate * spend.ratio
        if spend.cap is not None and spend.charged + spend.reserved + amount > spend.cap + 1e-9:
            spend.lock.release()
            raise BudgetReached(provider, spend.cap, spend.charged, spend.reserved, amount)
        spend.reserved += amount
        return Reservation(provider, estimate, amount)

    def resend(self, held: Reservation) -> None:
        """The same call is sent again (a provider that dedupes): its reservation stands; it
        takes the send lock again."""
        self._of(held.provider).lock.acquire()
        with self._guard:
            held.sending = True

    def answered(self, held: Reservation) -> None:
        """The call's answer is in (or it failed): the next call of the provider may go."""
        with self._guard:
            if not held.sending:
                return
            held.sending = False
        self._of(held.provider).lock.release()

    def settle(self, held: Reservation, charged: float | None) -> None:
        """Replace the reservation by what the provider charged (None: the estimate stands)."""
        if held.settled:
            return
        spend = self._of(held.provider)
        with self._guard:
            held.settled = True
            spend.reserved -= held.amount
            spend.charged += held.amount if charged is None else charged
            if charged is not None and held.estimate > 0:
                spend.ratio = max(spend.ratio, charged / held.estimate)

    def give_back(self, held: Reservation) -> None:
        """Nothing was created: the reservation is returned whole."""
        if held.settled:
            return
        with self._guard:
            held.settled = True
            self._of(held.provider).reserved -= held.amount

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per provider: cap, charged and still reserved (maybe charged), and the highest
        charge/quote ratio seen (a backfill scales its later dates' estimates by it), for the manifest."""
        with self._guard:
            return {p: {"cap": s.cap, "charged": round(s.charged, 4), "reserved": round(s.reserved, 4),
                        "ratio": round(s.ratio, 4)} for p, s in sorted(self._spend.items())}


_RUNS: dict[str, RunBudget] = {}
_RUNS_LOCK = threading.Lock()


def open_run(flow_run_id: str, caps: dict[str, float]) -> RunBudget:
    """The budget of a flow run, made once (a resumed run's process makes it again)."""
    with _RUNS_LOCK:
        return _RUNS.setdefault(flow_run_id, RunBudget(caps))


def for_run(flow_run_id: str | None) -> RunBudget | None:
    with _RUNS_LOCK:
        return _RUNS.get(flow_run_id or "")


def close_run(flow_run_id: str) -> None:
    with _RUNS_LOCK:
        _RUNS.pop(flow_run_id, None)
