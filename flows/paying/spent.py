"""What earlier runs of a run date were charged, or may have been, per provider, on its items
then and now (an item taken out of the spec was paid for all the same).

`run.max_credits` caps what a pipeline's run date costs, not what each run of it pays: a rerun
after `BudgetReached` (or a crash, or a second run of the date) starts from what the earlier
runs spent, read from the date's archive and ledger, so three runs of a date capped at 13 can
no longer be charged 24. What each earlier paid step counts:

- an item archived before: its archived credits;
- a job submitted or done (to be collected, not paid again): what the provider said it charged
  at submit (触站AI's `used`), else its estimate;
- a submit whose answer was never seen (`sending`, `unknown`): its estimate, scaled by the worst
  charge-to-estimate ratio the date showed (maybe charged: counted, as a run counts it);
- a job that ran and failed: what was taken at submit, else nothing; a refused call: nothing;
- a paid upscale sent: its estimate per image;
- and, for every step, what its earlier attempts that ran and failed took at submit, or what a
  record of another request counted (the spec changed the item) before a new one replaced it:
  the record's `charged_before`; an archived item's credits include it. A record of another
  provider (the item moved) was set aside, not replaced (`JobLedger.set_aside`): it counts in
  its own provider's spend as it did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flows.models import ArchivedItem, ItemPlan
from flows.paying.ledger import JobLedger, JobRecord, State, Step

PAID = frozenset({State.SUBMITTED, State.DONE, State.ARCHIVED})  # a job that was paid for
MAYBE = frozenset({State.SENDING, State.UNKNOWN})  # a submit whose answer was never seen


@dataclass
class Earlier:
    """Per provider, what the date's earlier runs spent and the worst charge/estimate they saw."""

    spent: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)
    paid: set[str] = field(default_factory=set)  # items whose job is paid for: collected, not sent again

    def add(self, provider: str, credits: float) -> None:
        if credits:
            self.spent[provider] = round(self.spent.get(provider, 0.0) + credits, 6)


def earlier_spend(ledger: JobLedger, plans: Sequence[ItemPlan], reused: Mapping[str, ArchivedItem]) -> Earlier:
    """What the date's earlier runs spent, on `plans` and on items since taken out of the spec
    (paid for all the same), from `reused` and the ledger (one listing; a read per record not
    in `reused`, and per paid upscale record a reused item's credits do not include)."""
    earlier = Earlier()
    by_id = {plan.item_id: plan for plan in plans}
    for archived in reused.values():
        earlier.add(archived.provider, archived.credits)
    records = ledger.records(only=lambda item, index: item not in reused or _left_over(by_id.get(item), index))
    priced = [(record, _estimate(by_id.get(record.item_id), record)) for record in records]
    for record, estimate in priced:
        if record.charged is not None and estimate:
            earlier.ratio[record.provider] = max(earlier.ratio.get(record.provider, 1.0), record.charged / estimate)
    for record, estimate in priced:  # the ratio of the whole date first: a lost answer counts at its worst
        earlier.add(record.provider, _cost(record, estimate, earlier.ratio.get(record.provider, 1.0)))
        plan = by_id.get(record.item_id)
        if (record.step is Step.GENERATE and record.state in PAID | MAYBE and plan is not None
                and record.base_request_id == plan.request.request_id):  # else it is paid again
            earlier.paid.add(record.item_id)
    return earlier


def _left_over(plan: ItemPlan | None, index: int | None) -> bool:
    """A reused item's paid upscale record that its archived credits do not include: the spec
    no longer upscales it with the provider, or asks for fewer images."""
    return index is not None and (plan is None or not plan.provider_refines or index > plan.request.count)


def carried(record: JobRecord | None, estimate: float, ratio: float = 1.0) -> float:
    """What a record of another request counts in its date's spend (the spec changed what the
    item pays for, and a new record replaces it, keeping this as its `charged_before`):
    `estimate` stands for the record's own where it has none (written before records had one);
    an answer never seen counts at `ratio`, the worst charge/estimate the date showed."""
    if record is None:
        return 0.0
    return _cost(record, record.estimate if record.estimate is not None else estimate, ratio)


def replaced(found: JobRecord | None, base_request_id: str, provider: str, estimate: float,
             ratio: float = 1.0) -> float:
    """What `found`, a step's record that a record of request `base_request_id` replaces, counted
    in the date's spend (`carried`); 0 where it is of that request, or of another provider (its
    credits are in another unit: left out)."""
    if found is None or found.base_request_id == base_request_id or found.provider != provider:
        return 0.0
    return carried(found, estimate, ratio)


def _estimate(plan: ItemPlan | None, record: JobRecord) -> float:
    """The estimate of the step `record` is of, as sent where the record says; else the plan's
    (0 where the item was not priced), or for an item no longer in the spec what it archived."""
    if record.estimate is not None:
        return record.estimate
    if plan is None:  # a record written before records kept their estimate
        return float((record.archived or {}).get("credits") or 0.0)
    if record.step is Step.REFINE:
        return plan.refine_credits / max(1, plan.request.count)
    return plan.estimate.credits if plan.estimate is not None else 0.0


def _cost(record: JobRecord, estimate: float, ratio: float) -> float:
    """What one earlier paid step counts (see the module's list), with what its earlier failed
    attempts took at submit."""
    return record.charged_before + _attempt_cost(record, estimate, ratio)


def _attempt_cost(record: JobRecord, estimate: float, ratio: float) -> float:
    """What the record's current attempt counts."""
    if record.state in PAID:
        return record.charged if record.charged is not None else estimate
    if record.state in MAYBE:
        return record.charged if record.charged is not None else estimate * ratio
    if record.state is State.FAILED:
        return record.charged or 0.0
    return 0.0  # refused: nothing was created
