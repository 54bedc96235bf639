"""Runs that fail closed (issue 25, items 3 and 4), on real processes.

1. The Prefect server goes away for longer than a lease while a run is between paid calls:
   the run finds its claim lost, says so in one line, and starts no paid call after it; a
   second run of the date, started once the server is back, waits for the claim and pays for
   the rest. The emulator witnesses: every image charged once.
2. A run's console dies (the worker that read its output was killed): the run goes on instead
   of dying in whatever it was doing, and SIGHUP then stops it between paid calls, leaving
   nothing `sending`.

Then the checks alone, without a server: a claim in doubt holds a paid call back until it is
renewed; one unrenewed for its whole lease is lost for good; one lost while a paid call waits
for its request slot stops that call before the wire.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import httpx
import pytest
import respx

from deployments import server
from flows.paying.ledger import JobLedger
from flows.specs.spec import load_spec
from sandbox.launcher import free_port
from tests.test_pay_once import (charges, configure, emulators, ledger_states, once_each,  # noqa: F401 - a fixture
                                 spec_text, write_spec)

ROOT = Path(__file__).parent.parent


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert proc is None or proc.poll() is None, f"the run ended before {what}: " + (log.read_text()[-3000:] if log else "")
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s: " + (log.read_text()[-3000:] if log else "")
        time.sleep(0.2)
    return found


def run_env(api_url: str, home: Path) -> dict[str, str]:
    """A run's environment against the server at `api_url` (its own repossessor frees leases)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO", "IMAGEGEN_RECLAIM_LEASES": "0",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # A request sent while the server restarts can hang for the client's whole timeout (60 s).
            "PREFECT_API_REQUEST_TIMEOUT": "10"}


def register_on(api_url: str, sandbox) -> None:  # noqa: ANN001
    """The sandbox's Blocks and limits, saved on the server at `api_url`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.limits import apply_limits
    from sandbox import launcher

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        launcher.register_blocks(sandbox)
        apply_limits({p: [launcher.BLOCK_NAME] for p in sandbox.providers})


def kill_server(root: Path) -> None:
    """The server stops at once (SIGKILL; faster than `server.down`, which waits for it)."""
    state = server.ServerState.load(root)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state.pid, signal.SIGKILL)
    while server.running(state):
        time.sleep(0.1)


@pytest.mark.slow  # a minute's outage, its own server
@pytest.mark.parametrize("provider", ["tencent", "tams", "chuzhan"])
def test_a_run_that_loses_its_claim_in_an_outage_starts_no_paid_call_after_it(emulators, tmp_path, provider) -> None:  # noqa: F811
    """The Prefect server goes away for longer than the claim's lease while a paid job is in
    flight: the run says once that its claim is lost, makes no paid call after it, and a second
    run of the date completes it; every image charged once (the emulator's count). The row
    "Prefect away past a lease" of the fault matrix's table (`docs/paying-once.md`)."""
    from tests.test_fault_matrix import doc_table

    name, day, n = f"failclosed-outage-{provider}", date(2026, 8, 3), 4
    path = write_spec(tmp_path, spec_text(provider, name, n, ", max_parallel: 1"), name)
    root, port = tmp_path / "server", free_port()
    state = server.up(root, port=port, database="sqlite")
    env = run_env(state.api_url, tmp_path / "client-home")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = second = None
    try:
        register_on(state.api_url, emulators)
        configure(emulators, provider, latency=5)  # the first job stays in flight through the outage
        argv = [sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()]
        first = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=first_log.open("w"), stderr=subprocess.STDOUT)
        wait_for("submitted job", lambda: "submitted" in ledger_states(path, day).values(), 120, first, first_log)
        # Between paid calls (a job in flight), the server goes away for longer than the claim's lease.
        stopped = time.monotonic()
        assert server.down(root)
        lost = f"the claim imagegen:run:{name}:{day} is lost"
        wait_for("lost claim", lambda: lost in first_log.read_text(), 75, first, first_log)
        print(f"the first run found its claim lost {time.monotonic() - stopped:.0f} s into the outage")
        restarting = time.monotonic()
        server.up(root, port=port)
        print(f"the server took {time.monotonic() - restarting:.0f} s to start again")
        configure(emulators, provider, latency=0.6)
        # Once the first run tried its next paid call (its job polled to the end), the second
        # run of the date starts: it waits for the claim until the server frees it, then pays.
        refused = "Task run encountered an exception ClaimLost"
        wait_for("refused paid call", lambda: refused in first_log.read_text(), 90, None, first_log)
        second = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=second_log.open("w"), stderr=subprocess.STDOUT)
        print(f"the second run started {time.monotonic() - stopped:.0f} s after the outage began; the first run "
              f"{'was still running' if first.poll() is None else 'had ended'}")
        assert first.wait(timeout=120) == 1, first_log.read_text()[-3000:]
        assert second.wait(timeout=120) == 0, second_log.read_text()[-3000:]
    finally:
        configure(emulators, provider, latency=0.6)
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        kill_server(root)
    text = first_log.read_text()
    said = [line for line in text.splitlines() if lost in line and "Flow run" in line]
    assert len(said) == 1 and "expired on the Prefect server" in said[0], said
    after = text[text.index(said[0]):]
    assert "accepted request" not in after, after[-3000:]  # no paid call after the loss, though it tried
    assert "Task run encountered an exception ClaimLost: the claim" in after, after[-3000:]
    print(said[0])
    assert charges(emulators, provider, name) == once_each(name, n)
    assert set(ledger_states(path, day).values()) == {"archived"}
    assert doc_table()[(provider, "polling", "Prefect away past a lease")] == "held"
    from flows.backfill import manifest_status
    from flows.specs.spec import load_spec

    assert (manifest_status(load_spec(path), day) or {}).get("status") == "complete"  # the second run's


def run_logs_named(run_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
        assert len(runs) == 1, runs
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))]


@pytest.mark.slow  # an `imagegen run` process
def test_a_run_whose_console_dies_goes_on_and_sighup_stops_it_between_paid_calls(emulators, tmp_path) -> None:  # noqa: F811
    from tests.test_limits_and_faults import cli_env

    name, day, n = "failclosed-console", date(2026, 8, 4), 4
    path = write_spec(tmp_path, spec_text("tencent", name, n, ", max_parallel: 1"), name)
    configure(emulators, "tencent", latency=1.5)
    # As a process worker starts a flow run: a session of its own, output to a pipe the worker reads.
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", day.isoformat()],
                            env={**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO"}, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "accepted request" in line:
                break
        proc.stdout.close()  # the worker dies: nobody reads the run's output any more
        wait_for("item sent after the console died",
                 lambda: list(ledger_states(path, day).values()).count("archived") >= 2, 60, proc)
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait(timeout=120)
    finally:
        configure(emulators, "tencent", latency=0.6)
        if proc.poll() is None:
            proc.kill()
    records = {r.item_id: r for r in JobLedger(load_spec(path).archive, name, day).records()}
    states = {item: r.state.value for item, r in records.items()}
    done = sorted(item for item, state in states.items() if state == "archived")
    assert set(states.values()) <= {"archived", "refused"} and 2 <= len(done) < n, states  # nothing left sending
    # A call recorded `sending` whose request then waited for its rate slot is stopped before the
    # wire: `refused`, nothing sent (the emulator charged it nothing), sent once by the next run.
    assert all(records[item].reason.startswith("RunStopping") for item in states if item not in done), records
    assert charges(emulators, "tencent", name) == {f"item {item[1:]} of {name}": 1 for item in done}
    logs = run_logs_named(f"{name}-{day}")
    assert any("console is gone" in line for line in logs), logs[-20:]
    assert any(line.startswith("SIGHUP: this run starts no more paid calls") for line in logs), logs[-20:]
    stopped = [line for line in logs if re.search(r"RunStopping.*the process got SIGHUP", line)]
    assert stopped, logs[-20:]
    print(f"after its console died the run archived {len(done)} of {n} items; SIGHUP stopped it, refusing "
          f"{len(stopped)} paid call(s)")


# --- the checks themselves, without a server ------------------------------------------------------

CLAIM = "imagegen:run:unit:2026-01-01"


def test_a_lease_let_go_while_its_renewal_was_on_the_way_is_not_lost() -> None:
    """The renewer took a lease from its list, the run let it go (removed, then released), and
    the renewal came back 410: the lease was declared lost, and a run that had ended logged its
    claim lost. A lease still held is lost on the same answer."""
    from flows.paying.leases import Lease, LeaseState, Renewer

    gone = httpx.Response(410, request=httpx.Request("POST", "http://prefect/api/leases"))

    class Server:
        def renew_concurrency_lease(self, lease_id, duration) -> None:  # noqa: ANN001
            raise httpx.HTTPStatusError("gone", request=gone.request, response=gone)

    renewer, heard = Renewer(), []
    renewer.client = Server()
    let_go, held = (Lease(id=uuid4(), name=n, duration=60, on_lost=[heard.append]) for n in ("let-go", "held"))
    renewer.due[held] = 0.0
    renewer._renew(let_go)
    renewer._renew(held)
    assert (let_go.state(), held.state(), heard) == (LeaseState.HELD, LeaseState.LOST, [held])


def test_a_paid_call_waits_while_its_claim_is_in_doubt_and_goes_on_once_renewed() -> None:
    from flows.paying import paidcalls
    from flows.paying.leases import Lease

    claim = Lease(uuid4(), CLAIM, 60.0)
    claim.failed("the Prefect API did not renew it: ConnectError")
    threading.Timer(0.5, claim.renewed, args=(time.monotonic(),)).start()
    started = time.monotonic()
    with paidcalls.claim("run-doubt", claim):
        paidcalls.begin("run-doubt")
        paidcalls.end()
    assert 0.4 < time.monotonic() - started < 3


def test_a_stop_ends_waits_for_what_would_pay_not_for_a_job_paid_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.paying import paidcalls

    assert paidcalls.stops_waiting() is None
    monkeypatch.setattr(paidcalls, "_stop", ["SIGHUP"])
    assert paidcalls.stops_waiting() == "SIGHUP"  # a new job's slot, the claim: no wait once stopping
    with paidcalls.collecting():
        with paidcalls.collecting(False):  # nested: still collecting
            assert paidcalls.stops_waiting() is None  # a resumed job's slot is waited for: it is polled to the end
    assert paidcalls.stops_waiting() == "SIGHUP"


def test_a_claim_unrenewed_for_its_whole_lease_is_lost_for_good_and_said_once() -> None:
    from flows.paying import paidcalls
    from flows.paying.leases import Lease

    heard: list[str] = []
    claim = Lease(uuid4(), CLAIM, 60.0, confirmed=time.monotonic() - 61)
    claim.on_lost.append(lambda lease: heard.append(paidcalls.lost_claim_message(lease)))
    with paidcalls.claim("run-lost", claim):
        for _ in range(2):
            with pytest.raises(paidcalls.ClaimLost, match="expired on the Prefect server"):
                paidcalls.begin("run-lost")
        claim.renewed(time.monotonic())  # a late answer does not bring it back
        with pytest.raises(paidcalls.ClaimLost):
            paidcalls.begin("run-lost")
    assert len(heard) == 1 and heard[0].startswith(f"the claim {CLAIM} is lost: no renewal of its 60 s lease"), heard


def test_no_paid_call_of_a_run_starts_once_it_stopped_or_let_its_claim_go() -> None:
    """A run that stopped on an error (its flow body raised) while tasks still ran: they start no
    paid call, with or without the claim; a run that takes its claim again (a retried flow
    run) may pay again."""
    from flows.paying import paidcalls
    from flows.paying.leases import Lease

    with paidcalls.claim("run-ended", Lease(uuid4(), CLAIM, 60.0)):
        paidcalls.begin("run-ended")
        paidcalls.end()
        paidcalls.end_run("run-ended", "the run stopped on HTTPStatusError")
        with pytest.raises(paidcalls.RunStopping, match="the run stopped on HTTPStatusError: not sent, nothing paid"):
            paidcalls.begin("run-ended")
    with pytest.raises(paidcalls.RunStopping, match="the run stopped on HTTPStatusError"):
        paidcalls.begin("run-ended")  # the claim let go: still refused
    with paidcalls.claim("run-over", Lease(uuid4(), CLAIM, 60.0)):
        pass
    with pytest.raises(paidcalls.RunStopping, match="its run has ended"):
        paidcalls.begin("run-over")
    with paidcalls.claim("run-over", Lease(uuid4(), CLAIM, 60.0)):
        paidcalls.begin("run-over")  # taken again: it may pay
        paidcalls.end()


class MemoryLedger:
    """Keeps records in a dict: a stand-in for the S3 bucket behind `JobLedger.put`."""

    def __init__(self) -> None:
        self.records: dict[str, object] = {}
        self.bucket = SimpleNamespace(bucket_name="memory")

    def key(self, item_id: str, step: object = None, index: int | None = None) -> str:
        return f"{item_id}.{step}.{index}.json"

    def put(self, record):  # noqa: ANN001, ANN201
        self.records[record.item_id] = record
        return record


def journal_of_a_run(monkeypatch, provider: str, cap: float):  # noqa: ANN001, ANN201
    """A flow run's id (as the tasks read it), its budget capped at `cap`, and an item's journal
    whose paid call is quoted 4."""
    from flows.paying.budget import open_run
    from flows.paying.journal import ItemJournal
    from flows.paying.ledger import Step

    run_id = str(uuid4())
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", run_id)
    identity = {"item_id": "i0", "step": Step.GENERATE, "base_request_id": "r0", "request_id": "r0", "attempt": 1,
                "provider": provider, "block": "unit"}
    return run_id, open_run(run_id, {provider: cap}), ItemJournal(MemoryLedger(), None, identity, cost=4.0)


def test_a_call_answered_after_its_run_closed_the_budget_lets_the_provider_s_next_call_go(monkeypatch) -> None:
    """The run stopped on an error and closed its budget while a paid call was on the wire:
    its answer still releases the provider's send lock (it looked the budget up again, found
    none, and left the lock held: the next call of that provider waited for ever)."""
    from flows.paying.budget import close_run

    run_id, budget, journal = journal_of_a_run(monkeypatch, "chuzhan", 100.0)
    journal.sending()
    close_run(run_id)
    waiting = threading.Thread(target=lambda: budget.answered(budget.reserve("chuzhan", 4.0)), daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # one call of a provider at a time: it waits for the first's answer
    journal.settle(4.0)
    waiting.join(5)
    assert not waiting.is_alive()
    assert budget.summary()["chuzhan"]["charged"] == 4.0


class LosingJournal:
    """Begins the paid call as `ItemJournal.sending` does; the claim is then lost while the
    call waits for its request slot (a server that went away)."""

    def __init__(self, claim) -> None:  # noqa: ANN001
        self.claim, self.heard = claim, []

    def sending(self) -> None:
        from flows.paying import paidcalls

        paidcalls.begin("run-armed")
        self.heard.append("sending")
        self.claim.lose("lost while the call waited for its request slot")

    def refused(self, error: BaseException) -> None:
        from flows.paying import paidcalls

        paidcalls.end()
        self.heard.append(f"refused {type(error).__name__}")

    def unknown(self, error: BaseException) -> None:
        self.heard.append("unknown")

    def submitted(self, job_id: str, charged: float | None = None) -> None:
        self.heard.append("submitted")

    def done(self, job_id: str, images: list[bytes]) -> None:
        self.heard.append("done")


@pytest.mark.parametrize("name", ["chuzhan", "tams", "tencent"])
@respx.mock(assert_all_called=False)
def test_a_claim_lost_while_a_paid_call_waits_for_its_request_slot_sends_nothing(name: str) -> None:
    """The check right before the wire, in the flow's limiter: the call is refused after its
    slot, nothing reaches the provider, and the journal records it refused (safe to send again)."""
    from blocks.base import CreditEstimate
    from flows.paying.limits import LimitsFile, ProviderLimits
    from flows.paying import paidcalls
    from flows.paying.leases import Lease
    from flows.paying.slots import PrefectLimiter
    from tests.test_sending import block

    route = respx.route(host="provider.test").mock(return_value=httpx.Response(500))
    provider = block(name)
    provider.use_limiter(PrefectLimiter(name, "unit", LimitsFile(providers={name: ProviderLimits()})))
    claim = Lease(uuid4(), CLAIM, 60.0)
    journal = LosingJournal(claim)
    with paidcalls.claim("run-armed", claim), pytest.raises(paidcalls.ClaimLost):
        provider.run_job(type(provider).sample_request(), poll_interval=0.0, timeout=1.0, journal=journal,
                         estimate=CreditEstimate(credits=1.0, source="formula"))
    assert route.call_count == 0 and journal.heard == ["sending", "refused ClaimLost"]


def test_a_second_ask_refused_before_it_is_sent_keeps_the_first_ask_s_reservation(monkeypatch) -> None:
    """TAMS asks again under the same requestId after an answer was lost: if that second ask is
    refused before it goes out (the run stopping), the first ask may still have been charged, so
    its reservation stays (it was given back: the budget and credits_this_run undercounted)."""
    from blocks.errors import SubmitUnknown
    from flows.paying import paidcalls
    from flows.paying.budget import close_run

    run_id, budget, journal = journal_of_a_run(monkeypatch, "tams", 10.0)
    try:
        journal.sending()
        journal.unknown(SubmitUnknown("ReadTimeout after the request was sent", provider="tams"))
        paidcalls.end_run(run_id, "the run stopped on HTTPStatusError")
        with pytest.raises(paidcalls.RunStopping):
            journal.sending()
        assert budget.summary()["tams"]["reserved"] == 4.0
        budget.answered(budget.reserve("tams", 1.0))  # and the provider's next call is not blocked
    finally:
        close_run(run_id)


def test_calls_refused_after_their_paid_work_each_count_once_in_the_record(monkeypatch) -> None:
    """An item whose record replaced one of another request (2 counted there) makes ImageToImage
    twice, each failing the review. Each failed call counts (4), in the budget and in the record;
    the second `sending` used to write the replaced record's count back over the first failed
    call's (2 + 4 lost to 2), and the date's next run counted one call fewer."""
    from blocks.tencent import ReviewFailed
    from flows.paying.budget import BudgetReached
    from flows.paying.ledger import State

    run_id, budget, journal = journal_of_a_run(monkeypatch, "tencent", 8.0)
    journal.identity["charged_before"] = 2.0
    for _ in range(2):
        journal.sending()
        journal.charged_refusal(ReviewFailed("the generated image failed the review"))
    assert journal.record.state is State.REFUSED and journal.record.charged_before == 10.0
    assert budget.summary()["tencent"]["charged"] == 8.0
    with pytest.raises(BudgetReached, match=r"last call was refused: ReviewFailed: .*failed the review, counted as "
                       r"maybe charged \(10\)"):
        journal.sending()  # a third ask does not fit under the cap of 8; the error says why it is asked again


def test_a_sending_not_written_is_not_kept_as_sent(monkeypatch) -> None:
    """S3 away: the failed review's `refused` was not written (kept to write at the end of the
    step), then the next ask's `sending` was not written either, so nothing was sent. The
    journal kept `sending` in memory all the same, and the end of the step wrote it: a call
    never made, held for a person as maybe sent, its estimate counted again."""
    from blocks.tencent import ReviewFailed
    from flows.paying.ledger import LedgerUnavailable, State

    run_id, budget, journal = journal_of_a_run(monkeypatch, "tencent", 100.0)
    monkeypatch.setattr("flows.paying.journal.get_run_logger", lambda: logging.getLogger("journal"))  # no run here
    journal.sending()
    away = journal.ledger.put

    def unavailable(record):  # noqa: ANN001, ANN202
        raise LedgerUnavailable("ledger write: ConnectionError after 6 attempts")

    journal.ledger.put = unavailable
    journal.charged_refusal(ReviewFailed("the generated image failed the review"))
    with pytest.raises(LedgerUnavailable):
        journal.sending()
    journal.ledger.put = away
    journal.flush()
    assert journal.ledger.records["i0"].state is State.REFUSED and journal.ledger.records["i0"].charged_before == 4.0


def test_another_run_s_change_found_at_the_end_of_a_step_does_not_replace_its_outcome(monkeypatch) -> None:
    """A write of the step failed (S3 away), and when the end of the step wrote it again,
    another run had changed the record: `flush_or_log` used to raise `LedgerConflict` in the
    step's `finally`, throwing away its outcome (a job's images in hand). It logs, as a move
    that finds a conflict does, and the step goes on."""
    from flows.paying.journal import flush_or_log
    from flows.paying.ledger import LedgerConflict, LedgerUnavailable

    run_id, budget, journal = journal_of_a_run(monkeypatch, "tams", 100.0)
    monkeypatch.setattr("flows.paying.journal.get_run_logger", lambda: logging.getLogger("journal"))  # no run here
    journal.sending()

    def failing(exc: Exception):  # noqa: ANN202
        def put(record):  # noqa: ANN001, ANN202
            raise exc
        return put

    journal.ledger.put = failing(LedgerUnavailable("ledger write: ConnectionError after 6 attempts"))
    journal.submitted("job-1")
    journal.ledger.put = failing(LedgerConflict("changed by another run"))
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("journal").addHandler(handler)
    try:
        flush_or_log(journal)
    finally:
        logging.getLogger("journal").removeHandler(handler)
    assert any("another run changed its ledger record" in line and "job-1" in line for line in said), said


def test_a_sending_this_process_never_sent_is_settled_as_refused_not_left_for_a_person(monkeypatch) -> None:
    """The `sending` write failed (S3 may have kept it, its answer lost) and nothing was sent;
    the step's retry finds that very record and settles it as `refused`. A `sending` that
    followed an ask whose answer was never seen (`unknown`) may stand for a call made: it stays."""
    from flows.paying.journal import ItemJournal
    from flows.paying.ledger import LedgerUnavailable, State

    def unavailable(record):  # noqa: ANN001, ANN202
        kept["landed"] = record  # S3 carried it out; its answer was lost
        raise LedgerUnavailable("ledger write: ConnectionError after 6 attempts")

    for before, settled in ((None, State.REFUSED), (State.UNKNOWN, State.SENDING)):
        kept: dict = {}
        run_id, budget, journal = journal_of_a_run(monkeypatch, "tencent", 100.0)
        if before is not None:
            journal.sending()
            journal.unknown(RuntimeError("answer lost"))
        journal.ledger.put = unavailable
        with pytest.raises(LedgerUnavailable):
            journal.sending()
        retry = ItemJournal(MemoryLedger(), kept["landed"], journal.identity, cost=4.0)  # the step's next try
        retry.settle_unsent()
        assert retry.record.state is settled, (before, retry.record)


def test_a_synchronous_answer_s3_did_not_take_is_written_until_it_does_a_job_id_once(monkeypatch) -> None:
    """A synchronous call's images S3 could not keep: `done` writes no record without them (a
    rerun would read none), and the end of the step keeps them, then writes `done` naming them,
    for as many rounds as S3 stays away (up to `ANSWER_PATIENCE`). A record holding only a job
    id (in the log, and asked again under its request) gets one round, as before."""
    from flows.paying import journal as journals
    from flows.paying.journal import flush_or_log
    from flows.paying.ledger import LedgerUnavailable, State

    monkeypatch.setattr(journals, "get_run_logger", lambda: logging.getLogger("journal"))
    monkeypatch.setattr(journals, "ROUND_PAUSE", 0.0)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("journal").addHandler(handler)
    try:
        _, _, journal = journal_of_a_run(monkeypatch, "tencent", 100.0)
        journal.sending()
        ledger, real_put, away = journal.ledger, journal.ledger.put, {"keep": 3, "put": 4}

        def keep_results(record, images):  # noqa: ANN001, ANN202
            if away["keep"]:
                away["keep"] -= 1
                raise LedgerUnavailable("ledger result: ConnectionError after 6 attempts")
            return [f"kept/{record.request_id}-{n}.png" for n, _ in enumerate(images, start=1)]

        def put(record):  # noqa: ANN001, ANN202
            if away["put"]:
                away["put"] -= 1
                raise LedgerUnavailable("ledger write: ConnectionError after 6 attempts")
            return real_put(record)

        ledger.keep_results, ledger.put = keep_results, put
        journal.done("sync:abc", [b"image"])
        assert ledger.records["i0"].state is State.SENDING  # not `done` without its image
        flush_or_log(journal)
        assert (ledger.records["i0"].state, ledger.records["i0"].results) == (State.DONE, ["kept/r0-1.png"])
        assert any("held in this process only" in line for line in said), said

        _, _, other = journal_of_a_run(monkeypatch, "tencent", 100.0)
        other.sending()
        other.ledger.put = lambda record: (_ for _ in ()).throw(LedgerUnavailable("ledger write: gone"))
        other.submitted("job-7")
        flush_or_log(other)  # one round: returns at once
        assert any("stays unrecorded as submitted, job job-7" in line for line in said), said
    finally:
        logging.getLogger("journal").removeHandler(handler)
