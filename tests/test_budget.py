"""The budget holds on what the providers charge: a reservation before each paid call, settled
with the charge the provider reports, so a price that rose since the quote stops the run at the
cap (on the emulator's own count), not after paying for every item."""

from __future__ import annotations

import json
import threading
import time
from datetime import date

import httpx
import pytest

from flows.paying.budget import BudgetReached, RunBudget
from tests.conftest import chuzhan_stats, run_spec, tams_stats
from tests.test_pay_once import emulators  # noqa: F401 - a fixture


def test_a_reservation_that_does_not_fit_is_refused_and_a_higher_charge_raises_the_next() -> None:
    budget = RunBudget({"chuzhan": 20.0})
    first = budget.reserve("chuzhan", 4.0)
    budget.settle(first, 16.0)  # the provider took four times its quote
    budget.answered(first)
    with pytest.raises(BudgetReached, match="16 charged and 0 reserved, and the next call would reserve 16"):
        budget.reserve("chuzhan", 4.0)
    assert budget.summary()["chuzhan"] == {"cap": 20.0, "charged": 16.0, "reserved": 0.0, "ratio": 4.0}


def test_a_refused_call_gives_its_reservation_back_and_an_unknown_one_keeps_it() -> None:
    budget = RunBudget({"tams": 3.0})
    refused = budget.reserve("tams", 1.5)
    budget.give_back(refused)
    budget.answered(refused)
    unknown = budget.reserve("tams", 1.5)
    budget.answered(unknown)  # no answer seen: maybe charged, kept
    assert budget.summary()["tams"]["reserved"] == 1.5
    budget.answered(budget.reserve("tams", 1.5))
    with pytest.raises(BudgetReached):
        budget.reserve("tams", 1.5)


def test_calls_of_one_provider_reserve_and_send_one_at_a_time() -> None:
    budget = RunBudget({})
    held = budget.reserve("chuzhan", 1.0)  # no cap: still one send at a time
    second: list[float] = []
    thread = threading.Thread(target=lambda: second.append(budget.reserve("chuzhan", 1.0).amount))
    thread.start()
    thread.join(0.3)
    assert second == []  # waits for the first call's answer
    budget.answered(held)
    thread.join(5)
    assert second == [1.0]


SPEC = """\
version: 1
name: {name}
provider: chuzhan
blocks: {{chuzhan: sandbox}}
generate: {{width: 512, height: 512}}
archive: {{bucket: imagegen-test, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60, max_parallel: 3, max_credits: {{chuzhan: 20}}}}
items:
{items}"""


def test_a_provider_charging_four_times_its_quote_stops_at_the_cap(sandbox_blocks, tmp_path) -> None:
    """Quoted 4 credits an image, five items: 20, within the cap of 20. The emulator takes 16
    an image: the first charge (16) is seen before the next call, which would pass the cap, so
    only one image is paid; the run ends Failed saying the budget was reached, with the spend."""
    url = sandbox_blocks.url("chuzhan")
    httpx.post(f"{url}/_sandbox/config", json={"price_rise": 4.0}).raise_for_status()
    name = "budget-charged"
    items = "".join(f"  - {{id: p{k}, prompt: 'poster {k} of {name}'}}\n" for k in range(5))
    try:
        before = chuzhan_stats(sandbox_blocks)
        state = run_spec(tmp_path, SPEC.format(name=name, items=items), date(2026, 8, 20))
        after = chuzhan_stats(sandbox_blocks)
    finally:
        httpx.post(f"{url}/_sandbox/config", json={"price_rise": 1.0})
    assert after["charged_credits"] - before["charged_credits"] == 16  # one image; never past the cap of 20
    assert after["submits"] - before["submits"] == 1
    assert state.is_failed()
    from tests.test_limits_and_faults import manifest_of

    manifest = manifest_of(state)
    errors = [i["error"] for i in manifest["items"] if i.get("error")]
    assert len(errors) == 4 and {e["error"] for e in errors} == {"BudgetReached"}
    assert "run.max_credits for chuzhan is 20" in errors[0]["message"]
    assert manifest["spend"]["chuzhan"] == {"cap": 20.0, "charged": 16.0, "reserved": 0.0, "ratio": 4.0}


def test_a_backfill_cap_holds_on_what_the_dates_were_charged(sandbox_blocks, tmp_path) -> None:
    """Three dates of two items, quoted 4 credits an image: 24, within the backfill's cap of 30.
    The emulator takes 16 an image. The first date's run gets a cap of 14 (30 less the next two
    dates' 16): one image, 16 charged. From then on estimates are scaled by the 4x seen, and no
    other date fits what is left: they are not started, saying why. 16 charged in all, not 96.
    Three dates may run at once, but none starts beside the first before a charge has shown
    the price (each would have paid 16 under a cap of 8: 48 against the cap of 30)."""
    from flows.backfill import BackfillFailed, backfill

    url = sandbox_blocks.url("chuzhan")
    name = "budget-backfill"
    items = "".join(f"  - {{id: p{k}, prompt: 'poster {k} of {name}'}}\n" for k in range(2))
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, items=items).replace("max_credits: {chuzhan: 20}", "max_credits: {chuzhan: 100}"))
    httpx.post(f"{url}/_sandbox/config", json={"price_rise": 4.0}).raise_for_status()
    try:
        before = chuzhan_stats(sandbox_blocks)
        state = backfill(spec=str(path), start=date(2026, 8, 21), end=date(2026, 8, 23), max_parallel=3,
                         max_credits=30, deployment=None, return_state=True)
        after = chuzhan_stats(sandbox_blocks)
    finally:
        httpx.post(f"{url}/_sandbox/config", json={"price_rise": 1.0})
    assert after["charged_credits"] - before["charged_credits"] == 16
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BackfillFailed), error
    rows = {r["date"]: r for r in error.rows}
    print(rows)
    assert rows["2026-08-21"]["credits"] == 16 and "budget" in rows["2026-08-21"]["reason"].lower(), rows
    for day in ("2026-08-22", "2026-08-23"):
        assert rows[day]["state"] == "not started" and "backfill's max_credits 30" in rows[day]["reason"], rows[day]


def test_a_backfill_of_two_providers_holds_each_cap_in_its_own_unit(sandbox_blocks, tmp_path) -> None:
    """Each date has a 触站AI item quoted 4 credits and a TAMS item; the backfill caps 触站AI at
    30 and TAMS at 1000, each in its own unit (one number over both would cap a sum of two
    currencies, and is refused). 触站AI takes 16 an image: the first date runs both items; then
    触站AI's estimates are scaled by the 4x seen, the next dates no longer fit its cap and are not
    started, saying which cap. On the emulators' counts: 16 charged by 触站AI, one TAMS job."""
    from flows.backfill import BackfillFailed, BackfillRefused, backfill

    url = sandbox_blocks.url("chuzhan")
    name = "budget-backfill-two"
    items = f"  - {{id: c, prompt: 'poster of {name}'}}\n  - {{id: t, prompt: 'a shoe of {name}', provider: tams}}\n"
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, items=items)
                    .replace("blocks: {chuzhan: sandbox}", "blocks: {chuzhan: sandbox, tams: sandbox}")
                    .replace("max_credits: {chuzhan: 20}", "max_credits: {chuzhan: 100, tams: 1000}"))
    one_number = backfill(spec=str(path), start=date(2026, 8, 24), end=date(2026, 8, 26), max_credits=30,
                          deployment=None, return_state=True).result(raise_on_failure=False)
    assert isinstance(one_number, BackfillRefused) and "uses chuzhan, tams, whose credits are different" in str(one_number)
    httpx.post(f"{url}/_sandbox/config", json={"price_rise": 4.0}).raise_for_status()
    try:
        before, tams_before = chuzhan_stats(sandbox_blocks), tams_stats(sandbox_blocks)
        state = backfill(spec=str(path), start=date(2026, 8, 24), end=date(2026, 8, 26), max_parallel=1,
                         max_credits={"chuzhan": 30, "tams": 1000}, deployment=None, return_state=True)
        after, tams_after = chuzhan_stats(sandbox_blocks), tams_stats(sandbox_blocks)
    finally:
        httpx.post(f"{url}/_sandbox/config", json={"price_rise": 1.0})
    assert after["charged_credits"] - before["charged_credits"] == 16
    assert tams_after["submits"] - tams_before["submits"] == 1
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BackfillFailed), error
    rows = {r["date"]: r for r in error.rows}
    assert rows["2026-08-24"]["status"] == "done" and rows["2026-08-24"]["credits"].startswith("chuzhan 16, tams "), rows
    for day in ("2026-08-25", "2026-08-26"):
        assert rows[day]["state"] == "not started" and "max_credits chuzhan=30 leaves" in rows[day]["reason"], rows[day]


def test_an_unanswered_call_s_reservation_grows_when_a_later_charge_shows_a_higher_price() -> None:
    """A submit whose answer was lost stays reserved at its quote; once a later answer shows
    the provider charging three times its quotes, it is held at that price too, so the next
    call that would pass the cap is not made."""
    budget = RunBudget({"chuzhan": 30.0})
    lost = budget.reserve("chuzhan", 4.0)
    budget.answered(lost)  # never settled: maybe charged
    seen = budget.reserve("chuzhan", 4.0)
    budget.settle(seen, 12.0)
    budget.answered(seen)
    assert budget.summary()["chuzhan"] == {"cap": 30.0, "charged": 12.0, "reserved": 12.0, "ratio": 3.0}
    with pytest.raises(BudgetReached):  # 12 + 12 + 12 > 30 (it was 12 + 4 + 12: sent, 36 in all)
        budget.reserve("chuzhan", 4.0)


def test_a_lost_answer_is_held_at_the_price_a_later_charge_shows(sandbox_blocks, tmp_path) -> None:
    """The emulator's own count: 触站AI takes four times its quote (16 for 4). The first draw is
    created and charged, its answer cut off (held at its quote of 4, maybe charged); the second
    is charged 16, which shows the price, so the lost one is held at 16 too: 32 of the cap of 36,
    and the third draw (16 more) is not sent. Held at its quote, the lost one would have left
    room for the third (4 + 16 + 16 = 36): 48 charged against a cap of 36."""
    url = sandbox_blocks.url("chuzhan")
    name = "budget-lost-answer"
    items = "".join(f"  - {{id: p{k}, prompt: 'poster {k} of {name}'}}\n" for k in range(3))
    spec = SPEC.format(name=name, items=items).replace("max_parallel: 3", "max_parallel: 1").replace(
        "chuzhan: 20}", "chuzhan: 36}, unknown_hold: 1")
    httpx.post(f"{url}/_sandbox/config", json={"price_rise": 4.0}).raise_for_status()
    httpx.post(f"{url}/_sandbox/faults", json={"kind": "drop_after", "count": 1}).raise_for_status()
    try:
        before = chuzhan_stats(sandbox_blocks)
        state = run_spec(tmp_path, spec, date(2026, 8, 24))
        after = chuzhan_stats(sandbox_blocks)
    finally:
        httpx.post(f"{url}/_sandbox/config", json={"price_rise": 1.0})
        httpx.delete(f"{url}/_sandbox/faults")
    assert after["charged_credits"] - before["charged_credits"] == 32, (before, after)
    from tests.test_limits_and_faults import manifest_of

    manifest = manifest_of(state)
    assert manifest["spend"]["chuzhan"] == {"cap": 36.0, "charged": 16.0, "reserved": 16.0, "ratio": 4.0}
    errors = {i["item"]: i["error"]["error"] for i in manifest["items"] if i.get("error")}
    assert errors.get("p2") == "BudgetReached", manifest["items"]


def test_earlier_runs_of_the_date_count_against_its_cap() -> None:
    budget = RunBudget({"tams": 5.0}, before={"tams": 3.0}, ratios={"tams": 1.0})
    budget.answered(budget.reserve("tams", 1.5))
    with pytest.raises(BudgetReached, match="3 charged by earlier runs of this date, 0 charged and 1.5 reserved.*"
                                            "raise run.max_credits to go on"):
        budget.reserve("tams", 1.5)
    assert budget.summary()["tams"] == {"cap": 5.0, "charged": 0.0, "reserved": 1.5, "ratio": 1.0, "earlier_runs": 3.0}


@pytest.mark.parametrize("provider, quote", [("tams", 1.0), ("chuzhan", 4.0), ("tencent", 1.0)])
def test_a_date_s_cap_holds_across_its_runs(emulators, tmp_path, provider: str, quote: float) -> None:
    """Two items paid within a cap of two and a half; the spec then gets a third item and the
    date runs again. Each run used to get the whole cap: the third was paid, the date charged
    three items' worth. Now the rerun counts what the first was charged, and sends nothing."""
    from tests.test_limits_and_faults import manifest_of
    from tests.test_pay_once import spec_text, stats

    name, cap = f"date-cap-{provider}", quote * 2.5
    first = run_spec(tmp_path, spec_text(provider, name, 2, run=f", max_credits: {{{provider}: {cap}}}"), date(2026, 8, 27))
    assert first.is_completed(), first
    assert manifest_of(first)["totals"]["credits_this_run"] == quote * 2
    before = stats(emulators, provider)
    again = run_spec(tmp_path, spec_text(provider, name, 3, run=f", max_credits: {{{provider}: {cap}}}"), date(2026, 8, 27))
    after = stats(emulators, provider)
    assert after["charges"] == before["charges"] and after["submits"] == before["submits"]  # the emulator's count
    error = again.result(raise_on_failure=False)
    assert f"{quote * 2:g} of them charged by earlier runs of this date" in str(error), error


def test_a_job_whose_answer_was_lost_is_collected_under_a_cap_that_fits_the_date(emulators, tmp_path) -> None:
    """TAMS, two items quoted 1 under a cap of 2. The first run stops item i0 right after TAMS
    made its job (its answer not recorded: `sending`, counted as maybe charged). The rerun asks
    for i0 again under the same requestId, which TAMS answers with the job it made. That call
    was reserved on top of the 1 already counted for it: 3 over the cap of 2, `BudgetReached`
    on every rerun, the job paid for and never collected. Now it is collected, paying nothing."""
    from flows.paying import faults
    from tests.test_pay_once import charges, spec_text, stats

    name, day = "date-cap-lost-answer", date(2026, 8, 29)
    text = spec_text("tams", name, 2, run=", max_credits: {tams: 2}")
    faults.install("answered", "i0", faults.stop)
    try:
        first = run_spec(tmp_path, text, day)
    finally:
        faults.clear()
    assert first.is_failed()
    before = stats(emulators, "tams")
    again = run_spec(tmp_path, text, day)
    after = stats(emulators, "tams")
    assert again.is_completed(), again.result(raise_on_failure=False)
    assert after["charges"] == before["charges"]  # i0's job was made once, by the first run
    assert charges(emulators, "tams", name) == {f"item {k} of {name}": 1 for k in range(2)}


def test_a_rerun_over_the_cap_still_collects_what_was_paid_for(emulators, tmp_path) -> None:
    """TAMS, two items quoted 1 under a cap of 2: the first run stops i0 after TAMS made its job
    (paid, not archived) and archives i1. The spec then gains i2 and the date runs again: 1 + 1
    charged and 1 more quoted is over the cap. The rerun was refused whole, and i0's paid job was
    never collected; now i0 is collected (nothing sent), and only i2 is refused."""
    from flows.paying import faults
    from tests.test_limits_and_faults import manifest_of
    from tests.test_pay_once import charges, spec_text, stats

    name, day = "date-cap-collect", date(2026, 8, 30)
    faults.install("polling", "i0", faults.stop)
    try:
        assert run_spec(tmp_path, spec_text("tams", name, 2, run=", max_credits: {tams: 2}"), day).is_failed()
    finally:
        faults.clear()
    before = stats(emulators, "tams")
    again = run_spec(tmp_path, spec_text("tams", name, 3, run=", max_credits: {tams: 2}"), day)
    after = stats(emulators, "tams")
    assert after["submits"] == before["submits"] and after["charges"] == before["charges"]
    items = {i["item"]: i for i in manifest_of(again)["items"]}
    assert items["i0"]["objects"] and not items["i0"].get("error"), items["i0"]
    assert items["i2"]["error"]["error"] == "BudgetExceeded", items["i2"]
    assert "2 of them charged by earlier runs of this date" in items["i2"]["error"]["message"]
    assert charges(emulators, "tams", name) == {f"item {k} of {name}": 1 for k in range(2)}


def test_reruns_after_the_budget_is_reached_pay_nothing_more(emulators, tmp_path) -> None:
    """触站AI charging twice its quotes, a cap of 13 for three items quoted 4 (12: it fits).
    The first run pays one image (8) and stops the others at the cap. Reruns, as after any
    failed run, each paid 8 more: 24 for the date. Now they count the 8 and the price seen."""
    from tests.test_pay_once import configure, spec_text

    name = "date-cap-reruns"
    text = spec_text("chuzhan", name, 3, run=", max_credits: {chuzhan: 13}")
    configure(emulators, "chuzhan", price_rise=2.0)
    try:
        before = chuzhan_stats(emulators)
        states = [run_spec(tmp_path, text, date(2026, 8, 28)) for _ in range(3)]
        after = chuzhan_stats(emulators)
    finally:
        configure(emulators, "chuzhan", price_rise=1.0)
    assert after["charged_credits"] - before["charged_credits"] == 8, (before, after)
    assert all(s.is_failed() for s in states)
    again = str(states[1].result(raise_on_failure=False))
    assert "charged by earlier runs of this date" in again and "raise run.max_credits" in again, again


@pytest.mark.parametrize("provider, quote", [("tams", 1.0), ("chuzhan", 4.0), ("tencent", 1.0)])
def test_an_item_edited_after_it_was_paid_keeps_what_it_was_charged(emulators, tmp_path, provider: str,
                                                                    quote: float) -> None:
    """A cap of two and a half items' worth; one item, archived, then its prompt edited twice,
    the date run again each time. Each edit pays for the item again, and its ledger record,
    replaced by the new request's, used to take the old charge with it: the third run counted
    one earlier payment and paid a third time. Now the new record keeps what the old one counted."""
    from tests.test_pay_once import spec_text, stats

    name, day, cap = f"date-cap-edited-{provider}", date(2026, 9, 2), quote * 2.5
    text = spec_text(provider, name, 1, run=f", max_credits: {{{provider}: {cap}}}")
    before = stats(emulators, provider)
    for edit in ("", "edited ", "edited twice "):
        state = run_spec(tmp_path, text.replace("'item 0", f"'{edit}item 0"), day)
    after = stats(emulators, provider)
    assert after["charges"] - before["charges"] == 2 and after["submits"] - before["submits"] == 2
    assert f"{quote * 2:g} of them charged by earlier runs of this date" in str(state.result(raise_on_failure=False))


@pytest.mark.parametrize("provider, quote", [("tams", 1.0), ("chuzhan", 4.0), ("tencent", 1.0)])
def test_an_item_taken_out_of_the_spec_still_counts(emulators, tmp_path, provider: str, quote: float) -> None:
    """Two items paid under a cap of two and a half; the spec then swaps item i1 for i2 and the
    date runs again. Only the spec's items were counted: i1's charge was forgotten and i2 paid,
    three items' worth for the date. Now the date's ledger counts every item it paid for."""
    from tests.test_pay_once import spec_text, stats

    name, day, cap = f"date-cap-swapped-{provider}", date(2026, 9, 3), quote * 2.5
    text = spec_text(provider, name, 2, run=f", max_credits: {{{provider}: {cap}}}")
    assert run_spec(tmp_path, text, day).is_completed()
    before = stats(emulators, provider)
    again = run_spec(tmp_path, text.replace("{id: i1, prompt: 'item 1", "{id: i2, prompt: 'item 2"), day)
    after = stats(emulators, provider)
    assert after["charges"] == before["charges"] and after["submits"] == before["submits"]
    assert f"{quote * 2:g} of them charged by earlier runs of this date" in str(again.result(raise_on_failure=False))


def test_an_edited_item_s_paid_upscales_keep_counting(emulators, tmp_path) -> None:
    """Tencent with RefineImage: an item is one job and one upscale, 2 calls, under a cap of 5.
    Archived, then edited: the upscale's replaced record kept its count, but the archived item's
    credits did not take it, so a third run, the spec gaining an item, counted 3 of the 4 calls
    paid and paid 2 more (6 under a cap of 5). Now the item's credits take what its upscales'
    records kept."""
    from tests.test_pay_once import spec_text, stats

    name, day = "date-cap-edited-refine", date(2026, 9, 4)
    one, two = (spec_text("tencent", name, n, run=", max_credits: {tencent: 5}").replace(
        "archive:", "upscale: {engine: provider, factor: 2}\narchive:") for n in (1, 2))
    before = stats(emulators, "tencent")
    states = [run_spec(tmp_path, text, day) for text in (one, one.replace("'item 0", "'edited item 0"),
                                                          two.replace("'item 0", "'edited item 0"))]
    after = stats(emulators, "tencent")
    assert states[0].is_completed() and states[1].is_completed()
    assert after["charges"] - before["charges"] == 4, (before["charges"], after["charges"])
    assert "4 of them charged by earlier runs of this date" in str(states[2].result(raise_on_failure=False))


def test_an_edit_undone_keeps_what_the_edited_request_paid(emulators, tmp_path) -> None:
    """TAMS under a cap of 2.5: i0 archived; its prompt edited and the run stopped after TAMS made
    the new job (paid, not archived); the edit undone, and the spec given i1. i0's sidecars were
    reused and its ledger record rebuilt from them over the edited request's, which was then
    counted nowhere: i1 was paid, 3 under a cap of 2.5. Now the rebuilt record keeps it."""
    from flows.paying import faults
    from tests.test_pay_once import spec_text, stats

    name, day = "date-cap-undone", date(2026, 9, 5)
    one, two = (spec_text("tams", name, n, run=", max_credits: {tams: 2.5}") for n in (1, 2))
    before = stats(emulators, "tams")
    assert run_spec(tmp_path, one, day).is_completed()
    faults.install("polling", "i0", faults.stop)
    try:
        assert run_spec(tmp_path, one.replace("'item 0", "'edited item 0"), day).is_failed()
    finally:
        faults.clear()
    undone = run_spec(tmp_path, two, day)
    deadline = time.monotonic() + 60  # the emulator charges a job when it ends: the stopped one may still run
    while (after := stats(emulators, "tams"))["charges"] - before["charges"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after["charges"] - before["charges"] == 2 and after["submits"] - before["submits"] == 2
    assert "2 of them charged by earlier runs of this date" in str(undone.result(raise_on_failure=False))


def test_an_upscale_no_longer_asked_for_keeps_counting(emulators, tmp_path) -> None:
    """Tencent under a cap of 3: i0 made and upscaled by RefineImage (2 calls), then edited with
    the upscale made locally (1 call: 3 for the date). Its RefineImage record, replaced by
    nothing, was skipped once i0 was reused, so the spec given i1 paid a fourth call. Now a
    reused item's left-over upscale records count."""
    from tests.test_pay_once import spec_text, stats

    name, day = "date-cap-upscale-dropped", date(2026, 9, 6)
    one, two = (spec_text("tencent", name, n, run=", max_credits: {tencent: 3}") for n in (1, 2))
    refined = one.replace("archive:", "upscale: {engine: provider, factor: 2}\narchive:")
    local = "upscale: {engine: lanczos, factor: 2}\narchive:"
    before = stats(emulators, "tencent")
    assert run_spec(tmp_path, refined, day).is_completed()
    assert run_spec(tmp_path, one.replace("'item 0", "'edited item 0").replace("archive:", local), day).is_completed()
    last = run_spec(tmp_path, two.replace("'item 0", "'edited item 0").replace("archive:", local), day)
    after = stats(emulators, "tencent")
    assert after["charges"] - before["charges"] == 3, (before["charges"], after["charges"])
    assert "3 of them charged by earlier runs of this date" in str(last.result(raise_on_failure=False))


def test_calls_refused_after_their_paid_work_count_against_the_cap(emulators, tmp_path) -> None:
    """Tencent ImageToImage with `review_failure_retries: 2`, under a cap of 2 calls; the emulator
    makes each image, charges it, then answers that it failed its review ("please try again").
    The retries were made inside one reservation, given back at the end: one item cost 3 under a
    cap of 2. Now each ask is reserved and each refused one counts as maybe charged: 2 calls, the
    third not sent; a rerun counts them and sends nothing; with the cap raised, it pays once more."""
    from deployments.limits import apply_limits
    from tests.test_pay_once import image_to_image_spec, inject, manifest_of, stats

    emulators.block("tencent").model_copy(update={"review_failure_retries": 2}).save("review-retries", overwrite=True)
    apply_limits({"tencent": ["review-retries"]})
    name, day = "date-cap-review-failed", date(2026, 9, 7)
    text = image_to_image_spec(name, 1, run=", max_credits: {tencent: 2}").replace(
        "{tencent: sandbox}", "{tencent: review-retries}")
    assert "review-retries" in text
    inject(emulators, "tencent", code="FailedOperation.GenerateImageFailed", action="ImageToImage", after=True,
           count=3)
    before = stats(emulators, "tencent")
    first = run_spec(tmp_path, text, day)
    after = stats(emulators, "tencent")
    assert not first.is_completed()
    assert after["charges"] - before["charges"] == 2, (before["charges"], after["charges"])
    assert after["by_action"]["ImageToImage"] - before["by_action"].get("ImageToImage", 0) == 2
    [error] = [item["error"]["message"] for item in manifest_of(first)["items"]]
    assert "budget reached: run.max_credits for tencent is 2; 2 charged" in error, error
    assert "this item's last call was refused: ReviewFailed" in error, error  # not only "raise the cap"

    httpx.delete(f"{emulators.url('tencent')}/_sandbox/faults")
    again = run_spec(tmp_path, text, day)
    assert not again.is_completed() and stats(emulators, "tencent")["requests"] == after["requests"]
    assert "2 of them charged by earlier runs of this date" in str(again.result(raise_on_failure=False))

    raised = run_spec(tmp_path, text.replace("max_credits: {tencent: 2}", "max_credits: {tencent: 3}"), day)
    assert raised.is_completed()
    assert stats(emulators, "tencent")["charges"] - before["charges"] == 3
    [item] = manifest_of(raised)["items"]
    assert item["credits"] == 3, item  # the image, and the two calls that failed their review


def test_an_item_moved_to_another_provider_still_counts_in_the_first(emulators, tmp_path) -> None:
    """TAMS under a cap of 2.5: t0 and t1 paid on TAMS; then t0 moved to 触站AI with a new prompt
    (the same request would be reused from the archive), its TAMS record replaced by the 触站AI
    one, whose count could not keep TAMS's credits (another unit). So the spec given t2 on TAMS
    counted only t1 and paid t2: 3 under 2.5. Now the TAMS record is set aside, not replaced,
    and goes on counting: that run is refused."""
    from tests.test_pay_once import stats

    name, day = "date-cap-moved", date(2026, 9, 8)
    path = tmp_path / f"{name}.yaml"

    def run(*items: str):  # noqa: ANN202 - a Prefect State
        lines = "".join(f"  - {{id: {i}, prompt: '{i} on {on} of {name}'{', provider: tams' if on == 'tams' else ''}}}\n"
                        for i, on in (item.split(":") for item in items))
        path.write_text(SPEC.format(name=name, items=lines)
                        .replace("blocks: {chuzhan: sandbox}", "blocks: {chuzhan: sandbox, tams: sandbox}")
                        .replace("max_credits: {chuzhan: 20}", "max_credits: {chuzhan: 100, tams: 2.5}"))
        return run_spec(tmp_path, path.read_text(), day, path=path)

    before = stats(emulators, "tams")
    assert run("t0:tams", "t1:tams").is_completed()
    assert run("t0:chuzhan", "t1:tams").is_completed()
    third = run("t0:chuzhan", "t1:tams", "t2:tams")
    after = stats(emulators, "tams")
    assert after["charges"] - before["charges"] == 2 and after["submits"] - before["submits"] == 2, (before, after)
    assert not third.is_completed()
    assert "tams: estimated 3 credits (2 of them charged by earlier runs of this date)" in str(
        third.result(raise_on_failure=False))
