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
- a refused call (nothing was created) gives its reservation back; an unknown one keeps it,
  scaled up when a later charge shows a higher ratio;
- what the date's earlier runs were charged counts too (`flows.paying.spent`): the cap is the
  date's, so a rerun pays only what is left of it.

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

    def __init__(self, provider: str, spend: ProviderSpend, cost: float) -> None:
        earlier = f"{spend.before:g} charged by earlier runs of this date, " if spend.before else ""
        super().__init__(f"budget reached: run.max_credits for {provider} is {spend.cap:g}; {earlier}"
                         f"{spend.charged:g} charged and {spend.reserved:g} reserved, and the next call would "
                         f"reserve {cost:g}" + ("; raise run.max_credits to go on" if spend.before else ""))
        self.provider = provider

    def after(self, last: str) -> BudgetReached:
        """The same refusal, saying how the item's last call ended (a person who raises the cap
        pays for another try of it)."""
        self.args = (f"{self.args[0]}; this item's last call {last}",)
        return self


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
    before: float = 0.0  # what earlier runs of the date were charged (`flows.paying.spent`)
    charged: float = 0.0
    reserved: float = 0.0
    ratio: float = 1.0  # the worst charge / estimate seen in this run or the date's earlier ones
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: list[Reservation] = field(default_factory=list)  # reservations not yet settled or given back

    def rescale(self, ratio: float) -> None:
        """A higher charge/estimate ratio seen: every reservation still open (an answer never
        seen: maybe charged at the higher price) is scaled to it, so the cap is not passed by
        more than one call's difference however the answers came."""
        if ratio <= self.ratio:
            return
        self.ratio = ratio
        for held in self.open:
            grown = held.estimate * ratio
            if grown > held.amount:
                self.reserved += grown - held.amount
                held.amount = grown


class RunBudget:
    """Charged and reserved credits per provider, against the run's caps."""

    def __init__(self, caps: dict[str, float], before: dict[str, float] | None = None,
                 ratios: dict[str, float] | None = None) -> None:
        self._caps = dict(caps)
        self._before, self._ratios = dict(before or {}), dict(ratios or {})
        self._spend: dict[str, ProviderSpend] = {}
        self._guard = threading.RLock()

    def _of(self, provider: str) -> ProviderSpend:
        with self._guard:
            if provider not in self._spend:
                self._spend[provider] = ProviderSpend(self._caps.get(provider), before=self._before.get(provider, 0.0),
                                                      ratio=max(1.0, self._ratios.get(provider, 1.0)))
            return self._spend[provider]

    def ratio(self, provider: str) -> float:
        """The worst charge/estimate ratio of `provider` the run and the date's earlier runs saw."""
        return self._of(provider).ratio

    def reserve(self, provider: str, estimate: float) -> Reservation:
        """Hold `estimate` (scaled by the provider's worst ratio) and the provider's send lock;
        `BudgetReached` (the lock released) when it does not fit under the cap."""
        spend = self._of(provider)
        spend.lock.acquire()
        with self._guard:
            amount = estimate * spend.ratio
            held = spend.before + spend.charged + spend.reserved
            if spend.cap is not None and amount > 0 and held + amount > spend.cap + 1e-9:  # 0: counted already
                spend.lock.release()
                raise BudgetReached(provider, spend, amount)
            spend.reserved += amount
            held = Reservation(provider, estimate, amount)
            spend.open.append(held)
            return held

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
            spend.open.remove(held)
            spend.reserved -= held.amount
            spend.charged += held.amount if charged is None else charged
            if charged is not None and held.estimate > 0:
                spend.rescale(charged / held.estimate)

    def give_back(self, held: Reservation) -> None:
        """Nothing was created: the reservation is returned whole."""
        if held.settled:
            return
        spend = self._of(held.provider)
        with self._guard:
            held.settled = True
            spend.open.remove(held)
            spend.reserved -= held.amount

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per provider: cap, charged and still reserved (maybe charged), and the highest
        charge/quote ratio seen (a backfill scales its later dates' estimates by it), for the manifest."""
        with self._guard:
            return {p: {"cap": s.cap, "charged": round(s.charged, 4), "reserved": round(s.reserved, 4),
                        "ratio": round(s.ratio, 4), **({"earlier_runs": round(s.before, 4)} if s.before else {})}
                    for p, s in sorted(self._spend.items())}


_RUNS: dict[str, RunBudget] = {}
_RUNS_LOCK = threading.Lock()


def open_run(flow_run_id: str, caps: dict[str, float], before: dict[str, float] | None = None,
             ratios: dict[str, float] | None = None) -> RunBudget:
    """The budget of a flow run, made once (a resumed run's process makes it again), counting
    what the date's earlier runs were charged (`before`) and the worst ratio they saw."""
    with _RUNS_LOCK:
        return _RUNS.setdefault(flow_run_id, RunBudget(caps, before, ratios))


def for_run(flow_run_id: str | None) -> RunBudget | None:
    with _RUNS_LOCK:
        return _RUNS.get(flow_run_id or "")


def close_run(flow_run_id: str) -> None:
    with _RUNS_LOCK:
        _RUNS.pop(flow_run_id, None)
