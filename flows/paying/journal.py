"""The ledger as a provider's `Journal` for one paid step of one item: every answer of a paid
call moves its record (`flows.paying.ledger`), settles its budget reservation (`flows.paying.budget`) and
lets the provider's next call go (`flows.paying.paidcalls`). Fault points (`flows.paying.faults`) name the
moments a process may stop at."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from flows.paying import faults
from flows.paying import paidcalls
from flows.paying import stalled
from flows.paying.budget import BudgetReached, Reservation, RunBudget, for_run
from flows.paying.ledger import JobLedger, JobRecord, LedgerConflict, LedgerUnavailable, State, Step, move


_UNSENT: dict[str, JobRecord] = {}  # where -> a `sending` this process wrote, S3 may have kept, and never sent
ANSWER_PATIENCE = 600.0
"""Seconds the end of a step keeps writing a synchronous call's answer that S3 did not take
(its images or result URL, `holds_answer`): it is only in this process until then, and cannot
be had again without paying. Past it, it is logged. Any other record gets one round of retries."""
ROUND_PAUSE = 1.0  # seconds between two rounds of those retries


class ItemJournal:
    """The ledger as a provider's `Journal` for one paid step of one item.

    A record that cannot be written after its retries stops the step before `sending` (nothing
    is sent unrecorded); after that the job goes on, its id is logged, and the record is
    written again at the end of the step (`flush`)."""

    def __init__(self, ledger: JobLedger, record: JobRecord | None, identity: dict[str, Any],
                 cost: float = 0.0) -> None:
        self.ledger, self.record, self.identity = ledger, record, identity
        self.unsaved = False
        self.unkept: list[bytes] | None = None  # results `done` could not keep: kept by `flush`
        self.cost = cost  # this paid call's estimated credits, reserved against the run's budget
        self.held: Reservation | None = None
        self.budget: RunBudget | None = None  # the budget `held` is in, kept: the run may close it first

    def _move(self, to: State, write: bool = True, **changes: Any) -> None:
        """Move the record and write it. A `sending` not written is not made (nor kept as the
        record: nothing was sent; `_UNSENT` remembers it, in case S3 kept it, for
        `settle_unsent`); any other move is, logged, and written again at the end of the step.
        What a replaced record counted (`charged_before` in the identity) is given to the first
        record only: later moves keep the record's own, which may have grown (a failed review)."""
        identity = self.identity if self.record is None else {k: v for k, v in self.identity.items()
                                                                 if k != "charged_before"}
        moved = move(self.record, to, **{**identity, **changes})
        if not write:  # written by `flush`, with what it needs first
            self.record, self.unsaved = moved, True
            return
        try:
            self.ledger.put(moved)
        except LedgerConflict:
            if to is State.SENDING:
                raise  # another run has this item: nothing is sent from here
            self.record = moved
            self.conflict_logged()
            paidcalls.recorded()  # S3 holds another run's record, not this `sending`
        except LedgerUnavailable as exc:
            if to is State.SENDING:
                if self.record is None or self.record.state in (State.REFUSED, State.FAILED):
                    _UNSENT[self._where()] = moved  # nothing of this request may have been sent before either
                raise
            self.record = moved
            self.unsaved = True
            get_run_logger().error("ledger write failed (%s): %s %s is %s%s; it is recorded again at the end of "
                                   "the step", exc, self.identity["item_id"], self.identity["step"], to.value,
                                   f", job {self.record.job_id}" if self.record.job_id else "")
        else:
            self.record = moved
            if to is not State.SENDING:
                paidcalls.recorded()

    def conflict_logged(self) -> None:
        """Log that another run changed the record, so this run's move of it is not recorded
        (the step goes on with what it holds)."""
        record = self.record
        get_run_logger().error("%s %s: another run changed its ledger record; this run's %s%s is not recorded",
                               self.identity["item_id"], self.identity["step"], record.state.value if record else "?",
                               f" (job {record.job_id})" if record and record.job_id else "")

    def _where(self) -> str:
        step = Step(self.identity["step"])
        key = self.ledger.key(self.identity["item_id"], step, self.identity.get("index") if step is Step.REFINE else None)
        return f"{self.ledger.bucket.bucket_name}/{key}"

    def settle_unsent(self) -> None:
        """A `sending` record found that this process wrote and then sent nothing for: S3
        carried the write out but its answer was lost, so the step stopped before sending and
        is tried again. It is `refused` (never sent), not left for a person as a call that may
        have been made."""
        record = self.record
        if record is None or record.state is not State.SENDING or _UNSENT.get(self._where()) != record:
            return
        self._move(State.REFUSED, reason="not sent: S3 kept its `sending` record but the answer was lost, so the "
                   "step stopped before sending")
        _UNSENT.pop(self._where(), None)

    def holds_answer(self) -> bool:
        """True while the record not written carries what the provider cannot give again (a
        synchronous call's images or result URL): only this process has it. A job id is in the
        log, and a provider asked again under the same request finds its job."""
        record = self.record
        return self.unkept is not None or (record is not None and bool(record.answer_urls or record.results))

    def flush(self) -> None:
        """Write the record a move could not write, keeping first the results `done` could not."""
        if self.unsaved and self.record is not None:
            if self.unkept is not None:
                self.record = self.record.model_copy(update={"results": self.ledger.keep_results(self.record,
                                                                                                 self.unkept)})
                self.unkept = None
            self.ledger.put(self.record)
            self.unsaved = False
            paidcalls.recorded()

    def sending(self) -> None:
        """Reserve the call's cost (`BudgetReached`: nothing is sent), check that the run may
        still pay (`flows.paying.paidcalls`: its claim and job slot held, no stop asked; else a
        `PaidCallRefused` and nothing is sent), then record `sending`."""
        again = self.budget is not None and self.held is not None and not self.held.settled
        if again:
            self.budget.resend(self.held)  # the same request again, where the provider dedupes
        elif (budget := for_run(flow_run.id)) is not None:
            try:
                self.held = budget.reserve(self.identity["provider"], 0.0 if self._counted() else self.cost)
            except BudgetReached as exc:
                raise self._after_last(exc) from None
            self.budget = budget
        try:
            paidcalls.begin(flow_run.id)
            self._move(State.SENDING, reason=None, estimate=self.cost)
        except BaseException:
            self._answered(given_back=not again)  # asked again: the first ask may have been charged
            raise
        self._fault("sending")

    def _after_last(self, reached: BudgetReached) -> BudgetReached:
        """`reached`, saying why the item's last call did not give its images (a failed review,
        a failed job), where it did not: raising the cap would pay for the same request again."""
        record = self.record
        if record is None or record.state not in (State.REFUSED, State.FAILED) or not record.reason:
            return reached
        counted = f", counted as maybe charged ({record.charged_before:g})" if record.charged_before else ""
        return reached.after(f"was {record.state.value}: {record.reason}{counted}")

    def _counted(self) -> bool:
        """This call asks again for a request whose answer was never seen (TAMS: its requestId
        returns the job it made): its cost is counted already, as maybe charged, by the run or
        the date's earlier run that sent it, so it is not reserved twice (a cap that fits the
        date's items would otherwise refuse to collect a job paid for)."""
        record = self.record
        return (record is not None and record.state in (State.UNKNOWN, State.SENDING)
                and record.request_id == self.identity["request_id"])

    def _fault(self, moment: str) -> None:
        faults.at(moment, self.identity["item_id"], Step(self.identity["step"]).value)

    def _answered(self, *, charged: float | None = None, given_back: bool = False, settle: bool = False) -> None:
        """The call's answer is in: settle or give back its reservation; the next call may go."""
        paidcalls.end()
        budget, held = self.budget, self.held  # not looked up again: a run that stopped on an error
        if budget is None or held is None:  # closed its budget, and a send lock left held would block its lane
            return
        if given_back:
            budget.give_back(held)
        elif settle or charged is not None:
            budget.settle(held, charged)
        budget.answered(held)

    def settle(self, charged: float | None) -> None:
        """The job is over: what the provider reported it charged (None: the estimate stands)."""
        self._answered(charged=charged, settle=True)

    def close(self) -> None:
        """The step is over: a call still holding its provider's send lock lets it go (its
        reservation stays: maybe charged)."""
        self._answered()

    def refused(self, error: BaseException) -> None:
        self._move(State.REFUSED, reason=f"{type(error).__name__}: {error}")
        self._answered(given_back=True)

    def charged_refusal(self, error: BaseException) -> None:
        """Refused after the paid work was done (a failed review): nothing to collect, but the
        call counts as maybe charged (`_charged_end`); the same request may be sent again."""
        self._charged_end(State.REFUSED, f"{type(error).__name__}: {error}")

    def unknown(self, error: BaseException) -> None:
        self._move(State.UNKNOWN, reason=f"{type(error).__name__}: {error}")
        self._answered()

    def submitted(self, job_id: str, charged: float | None = None, answer_urls: list[str] | None = None) -> None:
        self._fault("answered")
        if self.identity["step"] is Step.GENERATE:
            get_run_logger().info("%s: %s accepted request %s as job %s", self.identity["item_id"],
                                  self.identity["provider"], self.identity["request_id"], job_id)
        self._move(State.SUBMITTED, job_id=job_id, **({"charged": charged} if charged is not None else {}),
                   **({"answer_urls": answer_urls} if answer_urls else {}))
        self._answered(charged=charged)
        self._fault("polling")

    def done(self, job_id: str, images: list[bytes]) -> None:
        self._fault("answered")
        try:
            keys = self.ledger.keep_results(self.record, images) if self.record is not None else []
        except LedgerUnavailable as exc:  # the images are in memory: the step goes on and archives them
            get_run_logger().error("could not keep the results of %s %s (%s); they are archived from memory, and "
                                   "kept at the end of the step", self.identity["item_id"], self.identity["step"], exc)
            keys, self.unkept = [], images
        # Not `done` without its results, which a rerun would read as no images: `flush` keeps them first.
        self._move(State.DONE, write=self.unkept is None,
                   job_id=job_id if self.identity["step"] is Step.GENERATE else self.record.job_id, results=keys)
        self._answered(settle=True)  # a synchronous call: its answer was the results; the estimate stands

    def found_kept(self, keys: list[str]) -> None:
        """The call's results were kept in S3 before the process stopped, its record not yet
        naming them: `done` with them (nothing is sent; the budget is not touched). A record
        that names no job yet is given `kept-<request id>`: one that names none is taken for
        one written by hand, with nothing to resume."""
        record = self.record
        self._move(State.DONE, job_id=(record.job_id if record is not None else None) or
                   f"kept-{self.identity['request_id']}", results=keys)

    def failed(self, reason: str, *, maybe_charged: bool = False, rejected: bool = False) -> None:
        """The job ran and failed: its reservation settles at what was taken at submit (触站AI's
        `used`, maybe charged) or at nothing (TAMS documents that a failed job costs nothing;
        Tencent bills a successful call), as the manifest counts it; kept, it held the cap
        and showed in `credits_this_run` though no credit was taken. A job that may have been
        charged with no charge seen (`maybe_charged`: a failed review; a 触站AI task whose
        submit answer this process never saw) counts as `charged_refusal` does. `rejected`: on
        content rules, so the same request is not sent again."""
        charged = self.record.charged if self.record is not None else None
        if maybe_charged and not charged:
            self._charged_end(State.FAILED, reason, rejected=rejected)
            return
        self._move(State.FAILED, reason=reason, rejected=rejected)
        self._answered(charged=charged or 0.0, settle=True)

    def _charged_end(self, to: State, reason: str, **changes: Any) -> None:
        """The call or job ends with nothing to collect, counted as maybe charged: its estimate
        (at the worst ratio its reservation held) goes to the record's `charged_before` (the
        date's spend, the item's credits), and its reservation stands as charged."""
        before = self.record.charged_before if self.record is not None else 0.0
        held = self.held if self.held is not None and not self.held.settled else None
        counted = held.amount if held is not None and held.amount else self.cost
        self._move(to, reason=reason, charged_before=before + counted, **changes)
        self._answered(settle=True)


def flush_or_log(journal: ItemJournal) -> None:
    """Record what a step's unsaved writes said. While S3 is away it keeps trying, up to
    `ANSWER_PATIENCE` (the progress line tells the wait), then logs it (the job id is in the
    log) and goes on; another run's change found is logged. Either way the step's outcome is not
    replaced, and the archive step records the item once its images are in S3. The step's paid
    call lets its provider's next call go first, whatever happened."""
    try:
        _flush_or_log(journal)
    finally:
        paidcalls.recorded()  # written, or given up on: a stopping run waits no longer for it


def _flush_or_log(journal: ItemJournal) -> None:
    journal.close()
    if not journal.unsaved or journal.record is None:
        return
    started, told = time.monotonic(), False
    patience = ANSWER_PATIENCE if journal.holds_answer() else 0.0
    marked = stalled.holding if patience else stalled.waiting_on  # a second Ctrl-C names only what it loses
    with marked(f"ledger write of {journal.identity['item_id']} {journal.identity['step']}'s answer"):
        while True:
            try:
                journal.flush()
                return
            except LedgerConflict:  # as `_move` does: the step's outcome stands, the other run's record too
                journal.conflict_logged()
                return
            except LedgerUnavailable as exc:
                if time.monotonic() - started >= patience:
                    _unrecorded(journal, exc, f"stays unrecorded as {_said(journal.record)}")
                    return
                if not told:
                    told = True
                    _unrecorded(journal, exc, f"is {_said(journal.record)}, held in this process only: still "
                                f"writing it for up to {patience / 60:.0f} min")
                time.sleep(ROUND_PAUSE)


def _said(record: JobRecord | None) -> str:
    return f"{record.state.value if record else '?'}{f', job {record.job_id}' if record and record.job_id else ''}"


def _unrecorded(journal: ItemJournal, exc: Exception, what: str) -> None:
    get_run_logger().error("ledger still unavailable (%s): %s %s %s", exc, journal.identity["item_id"],
                           journal.identity["step"], what)
