"""Limits held on the Prefect server, faults survived, nothing paid twice: checked against
the emulator's own counters, with real processes where the guarantee is about processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pytest

from deployments.limits import apply_limits
from flows.paying.limits import load_limits, wanted_limits
from deployments.limits import limits_in_use
from flows.running.report import PipelineIncomplete
from tests.conftest import TEST_BUCKET, run_logs, run_spec, s3_client, tams_stats

ROOT = Path(__file__).parent.parent
SHORT = "sandbox-short"  # the sandbox account with a 2 s HTTP timeout, for slow-response faults


def spec_text(name: str, n: int, block: str = "sandbox", extra_run: str = "", prefix: str = "x") -> str:
    items = "".join(f"  - {{id: {prefix}{i}, prompt: item {i} of {name}}}\n" for i in range(n))
    return f"""\
version: 1
name: {name}
provider: tams
blocks: {{tams: {block}}}
generate: {{width: 512, height: 512, steps: 20, sampler: "Euler a"}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60{extra_run}{'' if 'max_parallel' in extra_run else ', max_parallel: 4'}}}
items:
{items}"""


@pytest.fixture()
def emulator(sandbox_blocks):
    """The emulator, with faults cleared and latency and balance restored after each test."""
    yield sandbox_blocks
    httpx.delete(f"{sandbox_blocks.url('tams')}/_sandbox/faults")
    httpx.post(f"{sandbox_blocks.url('tams')}/_sandbox/config", json={"latency": 0.6, "balance": 100000})


def inject(state, **fault) -> None:
    httpx.post(f"{state.url('tams')}/_sandbox/faults", json=fault).raise_for_status()


@pytest.fixture(scope="module")
def short_timeout_account(sandbox_blocks):
    from blocks.tams import TamsProvider

    TamsProvider(app_id=sandbox_blocks.account('tams')['app_id'], private_key=sandbox_blocks.secret('tams', 'private_key'),
                 endpoint=sandbox_blocks.url('tams'), timeout=2.0).save(SHORT, overwrite=True)
    apply_limits({"tams": [SHORT]})
    return SHORT


def manifest_of(state) -> dict:
    outcome = state.result(raise_on_failure=False)
    return outcome.manifest if isinstance(outcome, PipelineIncomplete) else outcome


def cli_env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_LOGGING_LEVEL": "WARNING"}


# --- limits as code ----------------------------------------------------------------------------

def test_every_provider_declares_its_limits() -> None:
    from blocks import PROVIDERS

    limits = load_limits()
    assert set(PROVIDERS) <= set(limits.providers)
    assert limits.providers["tams"].rate == {"api": 5}


def test_the_lease_setting_is_bounded_and_a_bad_one_is_named(monkeypatch) -> None:
    """`IMAGEGEN_LEASE_SECONDS` within Prefect's bounds; a value that is no number is an error
    naming the setting and the fix, before anything is held."""
    from flows.paying.slots import LeaseSettingInvalid, configured_lease

    for value, seconds in (("", 180.0), ("5", 60.0), ("90", 90.0), ("1e9", 86400.0)):
        monkeypatch.setenv("IMAGEGEN_LEASE_SECONDS", value)
        assert configured_lease(180) == seconds
    for value in ("3m", "nan"):
        monkeypatch.setenv("IMAGEGEN_LEASE_SECONDS", value)
        with pytest.raises(LeaseSettingInvalid, match=f"IMAGEGEN_LEASE_SECONDS='{value}' .* unset it for the default of 180"):
            configured_lease(180)


def test_limits_apply_is_idempotent_and_shows_usage(sandbox_blocks) -> None:
    first = apply_limits({"tams": ["acct-a"]})
    again = apply_limits({"tams": ["acct-a"]})
    assert first == again == {"imagegen:tams:acct-a:rate:api": (1, 4.5)}
    shown = [r for r in limits_in_use() if r["name"] == "imagegen:tams:acct-a:rate:api"]
    assert len(shown) == 1 and shown[0]["slot_decay_per_second"] == 4.5 and shown[0]["limit"] == 1
    out = subprocess.run([sys.executable, "-m", "flows.cli", "limits", "show"], capture_output=True, text=True,
                         env=cli_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "imagegen:tams:acct-a:rate:api: rate 4.5/s, active slots" in out.stdout


def test_a_missing_limit_is_an_error_not_a_silent_pass(sandbox_blocks) -> None:
    from flows.paying.slots import PrefectLimiter
    from flows.paying.slots import LimitMissing

    with pytest.raises(LimitMissing, match="imagegen limits apply"), \
            PrefectLimiter("tams", "account-without-limits").request("api"):
        pass
    with pytest.raises(LimitMissing), PrefectLimiter("chuzhan", "account-without-limits").job("draw"):
        pass


def test_declared_limits_cover_in_flight_caps() -> None:
    wanted = wanted_limits(load_limits(), {"tams": ["b"]})
    assert all(decay for _, decay in wanted.values())  # TAMS publishes a rate only


# --- faults ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fault", "use_short"), [
    ({"kind": "rate_limit", "count": 3}, False),
    ({"kind": "http_500", "count": 3}, False),
    ({"kind": "drop", "count": 2, "method": "POST", "path": "/v1/jobs"}, False),
    ({"kind": "drop", "count": 2, "method": "GET", "path": "/v1/jobs/"}, False),
    ({"kind": "slow", "count": 1, "method": "POST", "path": "/v1/jobs", "delay": 3}, True),
], ids=["rate-limit", "5xx", "drop-on-submit", "drop-on-poll", "slow-submit"])
def test_transient_faults_are_survived_without_paying_twice(emulator, short_timeout_account, tmp_path, fault,
                                                            use_short) -> None:
    name = f"fault-{fault['kind']}-{fault.get('method', 'any').lower()}"
    inject(emulator, **fault)
    before = tams_stats(emulator)
    state = run_spec(tmp_path, spec_text(name, 3, block=SHORT if use_short else "sandbox"), date(2026, 2, 1))
    after = tams_stats(emulator)
    assert state.is_completed(), manifest_of(state)
    assert after["injected_faults"] - before["injected_faults"] == fault["count"]
    assert after["submits"] - before["submits"] == 3  # one job per item, whatever was retried
    assert after["charges"] - before["charges"] == 3
    assert manifest_of(state)["totals"]["images"] == 3


def test_retries_and_progress_are_on_the_runs_log(emulator, tmp_path, flow_logs_at_info) -> None:
    """Three injected 429s each leave a line naming the reason, the wait and the attempt; the
    run logs its progress (items started, done, failed, credits, time) and its last count."""
    inject(emulator, kind="rate_limit", count=3)
    state = run_spec(tmp_path, spec_text("fault-logged", 2), date(2026, 2, 10))
    assert state.is_completed(), manifest_of(state)
    lines = run_logs(state, "2/2 items started, 2 done, 0 failed")
    retries = [line for line in lines if "retrying in" in line]
    assert len(retries) == 3 and all("HTTP 429" in line and " of 5)" in line for line in retries), retries
    last = next(line for line in lines if "2/2 items started, 2 done, 0 failed" in line)
    assert last.startswith("fault-logged 2026-02-10: ") and " credits, " in last and " elapsed" in last


def test_failed_job_is_recorded_and_retried_only_on_rerun(emulator, tmp_path) -> None:
    inject(emulator, kind="job_fail", count=1)
    before = tams_stats(emulator)
    state = run_spec(tmp_path, spec_text("fault-job-fail", 3), date(2026, 2, 2))
    manifest = manifest_of(state)
    assert state.is_failed() and manifest["totals"]["failed_items"] == 1 and manifest["totals"]["images"] == 2
    failed = next(i for i in manifest["items"] if i.get("error"))
    assert failed["error"]["step"] == "generate" and "out of GPU memory" in failed["error"]["message"]
    mid = tams_stats(emulator)
    assert mid["submits"] - before["submits"] == 3 and mid["charges"] - before["charges"] == 2
    # The rerun submits the failed item once more (a new attempt; failed jobs cost nothing),
    # and reuses the two archived ones.
    again = run_spec(tmp_path, spec_text("fault-job-fail", 3), date(2026, 2, 2))
    after = tams_stats(emulator)
    assert again.is_completed()
    assert after["submits"] - mid["submits"] == 1 and after["charges"] - mid["charges"] == 1
    assert manifest_of(again)["totals"]["reused_items"] == 2


def test_empty_balance_stops_the_run_and_says_why(emulator, tmp_path) -> None:
    httpx.post(f"{emulator.url('tams')}/_sandbox/config", json={"balance": 0})
    before = tams_stats(emulator)
    state = run_spec(tmp_path, spec_text("fault-balance", 6, extra_run=", max_parallel: 1"), date(2026, 2, 3))
    after = tams_stats(emulator)
    manifest = manifest_of(state)
    assert state.is_failed() and manifest["totals"]["images"] == 0
    errors = [i["error"] for i in manifest["items"]]
    assert errors[0]["error"] == "AccountStop" and "insufficient credits" in errors[0]["message"]
    # After the first account stop, later items are not submitted at all.
    assert any(e["error"] == "RunStopped" and "insufficient credits" in e["message"] for e in errors[1:])
    assert after["charges"] == before["charges"] and after["submits"] == before["submits"]


def test_spec_over_budget_makes_no_paid_call(emulator, tmp_path) -> None:
    before = tams_stats(emulator)
    state = run_spec(tmp_path, spec_text("budget", 4, extra_run=", max_credits: 3"), date(2026, 2, 4))
    after = tams_stats(emulator)
    assert state.is_failed() and "run.max_credits 3 (4 item(s) to run): above the cap" in str(state.result(raise_on_failure=False))
    assert after["submits"] == before["submits"] and after["uploads"] == before["uploads"]
    assert after["charges"] == before["charges"]


def test_estimate_command(emulator, tmp_path) -> None:
    path = tmp_path / "estimate.yaml"
    path.write_text(spec_text("estimate", 4, extra_run=", max_credits: 3"))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "estimate", str(path)], capture_output=True,
                         text=True, env=cli_env(), cwd=ROOT, timeout=120)
    assert ("tams: 4 item(s), 4.00 credits, 0.0120 USD (from the provider's api estimate; run.max_credits 3.0: "
            "OVER)") in out.stdout
    assert "total: 4.00 credits (run.max_credits 3.0: OVER)" in out.stdout and out.returncode == 1


def test_estimate_of_a_date_prices_what_its_run_would_pay_and_counts_what_earlier_runs_spent(emulator, tmp_path) -> None:
    """An estimate of a date already run priced every item, though the run paid for none of
    them; and its verdict on the cap left out what earlier runs of the date spent, which the
    run counts."""
    day, path = date(2026, 2, 5), tmp_path / "estimate-date.yaml"
    assert run_spec(tmp_path, spec_text("estimate-date", 2), day, path).is_completed()

    def estimate(spec: Path = path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "estimate", str(spec), "--run-date", day.isoformat()],
                              capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120)

    done = estimate()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"2 of 2 item(s) archived or paid for by an earlier run of {day}: not paid "
                                        "again, not priced", f"nothing to pay: a run of {day} sends no paid call"]
    copy = tmp_path / "copy-of-estimate-date.yaml"  # the same name: a run refuses it, as its estimate says
    copy.write_text(path.read_text())
    copied = estimate(copy)
    assert copied.stdout == done.stdout and (f"note: a run would not start: pipeline name 'estimate-date' in "
                                             "s3://") in copied.stderr, copied.stderr
    assert "belongs to spec" in copied.stderr and "Priced as a run with --take-over-name would pay" in copied.stderr
    path.write_text(spec_text("estimate-date", 4, extra_run=", max_credits: 3"))
    more = estimate()
    assert more.returncode == 1, more.stderr
    assert ("tams: 2 item(s), 2.00 credits, 0.0060 USD (from the provider's api estimate; run.max_credits 3.0, "
            "2.00 of it spent by earlier runs of this date: OVER)") in more.stdout, more.stdout
    before = tams_stats(emulator)
    assert run_spec(tmp_path, spec_text("estimate-date", 4, extra_run=", max_credits: 3"), day, path).is_failed()
    assert tams_stats(emulator)["charges"] == before["charges"]  # the run agrees: over its cap, nothing paid


def test_an_estimate_s_cap_verdict_says_when_what_earlier_runs_spent_is_not_known() -> None:
    """With S3 down an estimate said "within" the cap that the run, counting earlier spend, passed."""
    from flows.cli import _against_cap

    assert _against_cap(8.0, 1.5, None) == (False, "run.max_credits 8.0: within for these items alone; what earlier "
                                                   "runs of this date spent, which the run counts too, is not known")
    assert _against_cap(8.0, 1.5, 7.5) == (True, "run.max_credits 8.0, 7.50 of it spent by earlier runs of this date: "
                                                 "OVER")
    assert _against_cap(8.0, 1.5, 0.0) == (False, "run.max_credits 8.0: within")
    assert _against_cap(None, 1.5, None) == (False, "")


def test_an_outage_at_run_start_is_retried_and_a_fatal_error_still_leaves_a_true_manifest(emulator, tmp_path) -> None:
    import json

    inject(emulator, kind="http_500", count=6, method="POST", path="/v1/jobs/credits", exact=True)
    state = run_spec(tmp_path, spec_text("outage-start", 2), date(2026, 2, 8))
    assert state.is_completed(), manifest_of(state)
    # A run stopped by an error (here the budget) still says so in S3, item by item.
    state = run_spec(tmp_path, spec_text("fatal-manifest", 2, extra_run=", max_credits: 1"), date(2026, 2, 8))
    assert state.is_failed()
    body = s3_client(emulator).get_object(Bucket=TEST_BUCKET, Key="fatal-manifest/2026-02-08/manifest.json")["Body"]
    manifest = json.loads(body.read())
    assert manifest["status"] == "partial" and manifest["totals"]["images"] == 0
    assert {i["error"]["error"] for i in manifest["items"]} == {"BudgetExceeded"}


def test_budget_is_per_provider_in_its_own_unit(emulator, tmp_path) -> None:
    """Two providers' credits are never added up: a single number is refused for a mixed spec
    at file:line, and a per-provider cap stops only that provider's items."""
    from flows.specs.spec import SpecError, load_spec

    mixed = spec_text("budget-mixed", 4, extra_run=", max_credits: 3").replace(
        "  - {id: x3, prompt: item 3 of budget-mixed}",
        "  - {id: x3, prompt: item 3 of budget-mixed, provider: chuzhan}").replace(
        "blocks: {tams: sandbox}", "blocks: {tams: sandbox, chuzhan: sandbox}")
    path = tmp_path / "mixed.yaml"
    path.write_text(mixed)
    with pytest.raises(SpecError, match=r"mixed.yaml:7:57: run.max_credits: .*different units.*{chuzhan: 100, tams: 100}"):
        load_spec(path)
    path.write_text(mixed.replace("max_credits: 3", "max_credits: {tams: 2, chuzhan: 1000}"))
    state = run_spec(tmp_path, path.read_text(), date(2026, 2, 7), path=path)
    assert state.is_failed() and "tams: estimated 3 credits, run.max_credits 2 (4 item(s) to run)" in str(
        state.result(raise_on_failure=False))  # 3 TAMS items, cap 2
    path.write_text(mixed.replace("max_credits: 3", "max_credits: {tams: 3, chuzhan: 1000}"))
    before = tams_stats(emulator)
    state = run_spec(tmp_path, path.read_text(), date(2026, 2, 7), path=path)
    assert state.is_completed() and tams_stats(emulator)["submits"] - before["submits"] == 3


# --- processes ---------------------------------------------------------------------------------

def test_two_processes_on_one_account_never_exceed_the_rate(emulator, tmp_path) -> None:
    before = tams_stats(emulator)
    procs = []
    for name in ("proc-a", "proc-b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(spec_text(name, 6, prefix=name))
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date",
                                       "2026-02-05"], env=cli_env(), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    after = tams_stats(emulator)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert after["submits"] - before["submits"] == 12
    assert after["rate_limited"] == before["rate_limited"], "the emulator refused requests over 5/s"
    assert after["peak_requests_per_second"] <= 5
    print(f"two processes: {after['requests'] - before['requests']} requests, 0 over the limit, "
          f"peak {after['peak_requests_per_second']} in 1 s")


def test_killed_run_resumes_without_paying_twice(emulator, tmp_path) -> None:
    httpx.post(f"{emulator.url('tams')}/_sandbox/config", json={"latency": 8})
    path = tmp_path / "killed.yaml"
    path.write_text(spec_text("killed", 4))
    before = tams_stats(emulator)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--run-date", "2026-02-06"],
                            env=cli_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while tams_stats(emulator)["submits"] - before["submits"] < 4:
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before submitting"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = tams_stats(emulator)
    assert killed["charges"] == before["charges"], "the jobs were not finished when the run was killed"
    httpx.post(f"{emulator.url('tams')}/_sandbox/config", json={"latency": 0.6})
    state = run_spec(tmp_path, path.read_text(), date(2026, 2, 6), path=path)
    after = tams_stats(emulator)
    assert state.is_completed()
    assert after["submits"] - before["submits"] == 4, "an item was submitted twice"
    assert after["charges"] - before["charges"] == 4
    keys = {o["Key"] for o in s3_client(emulator).list_objects_v2(Bucket=TEST_BUCKET, Prefix="killed/")["Contents"]}
    assert {f"killed/2026-02-06/x{i}-1.png" for i in range(4)} <= keys
    print(f"kill and rerun: submits {after['submits'] - before['submits']}, charges "
          f"{after['charges'] - before['charges']}, duplicate submits "
          f"{after['duplicate_submits'] - before['duplicate_submits']}, over-limit {after['rate_limited'] - before['rate_limited']}")


# --- how the flow waits for limits ---------------------------------------------------------------

def test_lanes_keep_a_capped_provider_from_filling_the_window() -> None:
    """Items waiting for a provider's single job slot take at most one extra place in the
    window, so the other provider's items are submitted meanwhile, in spec order."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from flows.pipeline import in_lane_order

    plans = [SimpleNamespace(item_id=f"{p}{n}", provider=p) for n in range(4) for p in ("slow", "fast")]
    chains: dict = {}
    futures: dict[str, Future] = {}
    lanes = {"slow": 1, "fast": None}
    order = in_lane_order(plans, chains, max_parallel=4, lane=lambda plan: (plan.provider, lanes[plan.provider]))
    submitted = []
    for _ in range(4):  # nothing finishes: the window fills
        plan = next(order)
        futures[plan.item_id] = Future()
        chains[plan.item_id] = [("review", SimpleNamespace(wrapped_future=futures[plan.item_id]))]
        submitted.append(plan.item_id)
    assert submitted == ["slow0", "fast0", "slow1", "fast1"]  # slow: its cap of 1 plus one waiting
    futures["fast0"].set_result(None)
    plan = next(order)
    assert plan.item_id == "fast2"  # slow2 must wait for a slow item to finish, fast2 need not


def test_a_full_window_waits_for_a_chain_to_end_without_polling() -> None:
    """With the window full, the submitting loop sleeps until a chain ends (its done-callback
    wakes it) instead of looking at every item in flight again and again."""
    import threading
    from concurrent.futures import Future
    from types import SimpleNamespace

    from flows.pipeline import in_lane_order

    class Counted(Future):
        looks = 0

        def done(self) -> bool:
            Counted.looks += 1
            return super().done()

    plans = [SimpleNamespace(item_id=f"i{n}", provider="p") for n in range(3)]
    chains: dict = {}
    order = in_lane_order(plans, chains, max_parallel=2, lane=lambda plan: ("p", None))
    futures = []
    for _ in range(2):
        plan = next(order)
        futures.append(Counted())
        chains[plan.item_id] = [("archive", SimpleNamespace(wrapped_future=futures[-1]))]
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(next(order).item_id), daemon=True)
    waiter.start()
    waiter.join(0.5)  # the loop looks once, finds no room, and waits
    looks = Counted.looks
    futures[0].set_result(None)
    waiter.join(30)
    assert got == ["i2"]
    assert looks <= 4, looks  # polling every 0.05 s looked 20 times or more


def test_a_job_slot_is_handed_on_and_released_however_the_job_ends(sandbox_blocks) -> None:
    import threading

    from flows.paying import slotapi
    from flows.paying.slots import PrefectLimiter

    apply_limits({"tencent": ["slots-test"]})  # SubmitTextToImageJob: 1 in flight
    limiter = PrefectLimiter("tencent", "slots-test")
    sent_before = slotapi._path.sent
    inside, peak, lock = [0], [0], threading.Lock()

    def job(fail: bool) -> None:
        try:
            with limiter.job("SubmitTextToImageJob"):
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0.3)
                with lock:
                    inside[0] -= 1
                if fail:
                    raise RuntimeError("job failed")
        except RuntimeError:
            pass

    threads = [threading.Thread(target=job, args=(n % 2 == 0,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert peak[0] == 1
    slots = {r["name"]: r["active_slots"] for r in limits_in_use()}
    assert slots["imagegen:tencent:slots-test:jobs:SubmitTextToImageJob"] == 0
    # the grants, refusals and releases went on the direct path (`flows.paying.slotapi`), not Prefect's client
    assert slotapi._path.off is None and slotapi._path.sent - sent_before >= 8


def test_a_waiter_does_not_ask_while_its_own_process_holds_the_whole_cap(sandbox_blocks, monkeypatch) -> None:
    import threading

    from flows.paying import slots

    apply_limits({"tencent": ["wait-test"]})  # SubmitTextToImageJob: 1 in flight
    limiter = slots.PrefectLimiter("tencent", "wait-test")
    asks: list[str] = []
    real_call = slots._slot_call
    monkeypatch.setattr(slots, "_slot_call", lambda what, call: (asks.append(what), real_call(what, call))[1])
    taken, order = threading.Event(), []

    def first() -> None:
        with limiter.job("SubmitTextToImageJob"):
            taken.set()
            time.sleep(2.0)  # asking every 0.25 s meanwhile is 6 asks or more
            order.append("first released")

    holder = threading.Thread(target=first)
    holder.start()
    assert taken.wait(60)
    with limiter.job("SubmitTextToImageJob"):
        order.append("second in")
    holder.join(60)
    assert order == ["first released", "second in"]
    waiter_asks = [what for what in asks if what.startswith("slot of")][1:]  # [0] is the holder's own
    assert len(waiter_asks) <= 3, waiter_asks  # refused once, then asked again at the release


def test_rate_slots_are_never_taken_faster_than_the_limit(sandbox_blocks) -> None:
    from flows.paying.slots import take_rate

    apply_limits({"tams": ["rate-test"]})  # api: 5/s x 0.9 safety = 4.5/s on the server
    started = time.monotonic()
    for _ in range(6):
        take_rate("imagegen:tams:rate-test:rate:api", 4.5).answered()  # the request it was for got its answer
    assert time.monotonic() - started >= 5 / 4.5


@pytest.mark.parametrize("safety", [0.9, 0.8, 0.5])
def test_requests_late_by_up_to_twice_the_late_send_margin_still_arrive_within_the_published_rate(safety) -> None:
    """`late_send_seconds` is half the lateness the slots' spacing absorbs: requests leaving up
    to it late and then delayed as much again on the way never exceed the count in a second."""
    import random

    from flows.paying.limits import LimitsFile

    assert LimitsFile(rate_safety=1, providers={}).late_send_seconds is None
    limits, rng = LimitsFile(rate_safety=safety, providers={}), random.Random(7)
    for published in (2, 5, 20):
        spacing = 1 / limits.applied_rate(published)
        arrivals = sorted(n * spacing + rng.choice([0, 2 * limits.late_send_seconds - 1e-6]) for n in range(2000))
        most = max(sum(1 for b in arrivals[i:i + published + 2] if b - a < 1) for i, a in enumerate(arrivals))
        assert most <= published, (published, most)


def test_a_request_held_up_after_its_rate_slot_takes_a_fresh_one(sandbox_blocks, monkeypatch) -> None:
    """A paid call's check between its rate slot and its send waits (a lease in doubt; here a
    fault point holds it 0.3 s once): sent then, it would reach TAMS in the same second as the
    requests of the slots granted meanwhile. It takes a fresh slot instead."""
    from flows.paying import paidcalls, slots

    apply_limits({"tams": ["late-test"]})
    limiter = slots.PrefectLimiter("tams", "late-test")
    late = limiter.limits.late_send_seconds
    taken: list[slots.RateSlot] = []
    real_take, real_check = slots.take_rate, paidcalls.check_armed
    monkeypatch.setattr(slots, "take_rate", lambda *a: taken.append(real_take(*a)) or taken[-1])
    monkeypatch.setattr(paidcalls, "check_armed", lambda: (time.sleep(0.3) if len(taken) == 1 else None, real_check()))
    with limiter.request("api"):
        sent_at = time.monotonic()
    assert late is not None and 0 < late < 0.3
    # A third slot would be right too: a stall of the busy machine past `late` after the second.
    assert len(taken) >= 2 and sent_at - taken[-1].got_at <= late, (len(taken), sent_at - taken[-1].got_at)
