"""Backfill: dates already complete are skipped, missing and partly failed ones run, the credit
cap refuses up front, a table artifact reports each date. Here without a deployment (subflows);
through a deployment and workers in test_server_e2e.py."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from flows.backfill import (BackfillFailed, BackfillRefused, Pool, PoolSpent, backfill, check_arguments, dates_between,
                            NO_ROOM, over_caps, own_manifest, portable_spec, provider_caps, same_failure,
                            spend_by_provider)
from tests.conftest import TEST_BUCKET, latest_artifacts, s3_client, tams_stats


def spec(tmp_path: Path, name: str, items: str = "  - {id: a, prompt: a cat}\n  - {id: b, prompt: a dog}\n") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""\
version: 1
name: {name}
provider: tams
blocks: {{tams: sandbox}}
generate: {{width: 512, height: 512, steps: 20, sampler: "Euler a"}}
archive: {{bucket: {TEST_BUCKET}, credentials: sandbox}}
run: {{poll_interval: 0.2, job_timeout: 60}}
items:
{items}""")
    return str(path)


def test_dates_between() -> None:
    assert dates_between(date(2026, 1, 30), date(2026, 2, 2))[-1] == date(2026, 2, 2)
    with pytest.raises(BackfillRefused, match="the end 2026-01-30 is before the start 2026-02-02: give an end on"):
        dates_between(date(2026, 2, 2), date(2026, 1, 30))
    assert len(dates_between(date(2016, 1, 1), date(2026, 1, 7))) == 3660  # ten years of days
    with pytest.raises(BackfillRefused, match="is 3,652,059 dates, more than a backfill takes"):
        dates_between(date(1, 1, 1), date(9999, 12, 31))  # taken silently, priced for minutes


def test_backfill_runs_only_the_missing_dates_then_none(sandbox_blocks, tmp_path) -> None:
    from flows.pipeline import run_pipeline

    path = spec(tmp_path, "bf")
    for done in (date(2026, 6, 2), date(2026, 6, 4)):
        assert run_pipeline(spec=path, run_date=done, return_state=True).is_completed()
    before = tams_stats(sandbox_blocks)
    rows = backfill(spec=path, start=date(2026, 6, 1), end=date(2026, 6, 5), max_parallel=2)
    after = tams_stats(sandbox_blocks)
    assert [r["status"] for r in rows] == ["done", "skipped", "done", "skipped", "done"]
    assert after["submits"] - before["submits"] == 3 * 2  # three dates, two items each
    assert sum(r["credits"] for r in rows) == pytest.approx(after["charged_credits"] - before["charged_credits"])
    keys = {o["Key"] for o in s3_client(sandbox_blocks).list_objects_v2(Bucket=TEST_BUCKET, Prefix="bf/")["Contents"]}
    assert {f"bf/2026-06-0{d}/manifest.json" for d in range(1, 6)} <= keys
    # The same backfill again: every date is complete, nothing runs, nothing is paid.
    again = backfill(spec=path, start=date(2026, 6, 1), end=date(2026, 6, 5), max_parallel=2, return_state=True)
    assert [r["status"] for r in again.result()] == ["skipped"] * 5
    assert tams_stats(sandbox_blocks)["requests"] == after["requests"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # its runs list names it, beside its dates' `bf-<date>`
        assert client.read_flow_run(again.state_details.flow_run_id).name == "bf-backfill-2026-06-01-to-2026-06-05"


def test_a_partly_failed_date_is_run_again(sandbox_blocks, tmp_path) -> None:
    from flows.pipeline import run_pipeline

    path = spec(tmp_path, "bf-partial")
    run_pipeline(spec=path, run_date=date(2026, 6, 10), return_state=True)
    # Make the date partial: one item fails this time (a new item with a failing prompt).
    failing = spec(tmp_path, "bf-partial", "  - {id: a, prompt: a cat}\n  - {id: c, prompt: \"x [[fail]]\"}\n")
    assert run_pipeline(spec=failing, run_date=date(2026, 6, 10), return_state=True).is_failed()
    fixed = spec(tmp_path, "bf-partial", "  - {id: a, prompt: a cat}\n  - {id: c, prompt: a cow}\n")
    before = tams_stats(sandbox_blocks)
    rows = backfill(spec=fixed, start=date(2026, 6, 10), end=date(2026, 6, 10))
    assert rows[0]["status"] == "done"
    assert tams_stats(sandbox_blocks)["submits"] - before["submits"] == 1  # only the item that was missing


def test_backfill_over_its_credit_cap_runs_nothing(sandbox_blocks, tmp_path) -> None:
    path = spec(tmp_path, "bf-cap")
    before = tams_stats(sandbox_blocks)
    state = backfill(spec=path, start=date(2026, 7, 1), end=date(2026, 7, 3), max_credits=5, return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BackfillRefused) and "above the cap of 5" in str(error)
    assert tams_stats(sandbox_blocks)["submits"] == before["submits"]


def test_a_refused_backfill_is_one_line_in_the_terminal_without_a_traceback(sandbox_blocks, tmp_path) -> None:
    """As a person types it: the refusal comes from inside the backfill flow, which ends Failed
    with it (Prefect printed its traceback first)."""
    import subprocess
    import sys

    from tests.test_limits_and_faults import cli_env

    path = spec(tmp_path, "bf-cap-cli")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "backfill", path, "--start", "2026-07-05", "--end",
                          "2026-07-06", "--max-credits", "1", "--local"], env={**cli_env(), "PREFECT_LOGGING_LEVEL": "INFO"},
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1 and "Traceback" not in text, text[-3000:]
    assert "backfill not started: 2 date(s) to run are estimated at" in out.stderr, text[-3000:]
    assert "above the cap of 1.0; nothing was run" in out.stderr, text[-3000:]


def test_backfill_table_artifact(sandbox_blocks, tmp_path) -> None:
    backfill(spec=spec(tmp_path, "bf-art"), start=date(2026, 8, 1), end=date(2026, 8, 2))
    arts = latest_artifacts("bf-art-backfill", "bf-art-backfill-progress")
    assert arts["bf-art-backfill"].type == "table" and "2 done" in arts["bf-art-backfill"].description
    assert arts["bf-art-backfill-progress"].type == "progress" and float(arts["bf-art-backfill-progress"].data) == 100.0


def test_a_failed_date_ends_the_backfill_failed_with_its_reason(sandbox_blocks, tmp_path) -> None:
    path = spec(tmp_path, "bf-fails", "  - {id: a, prompt: a cat}\n  - {id: c, prompt: \"x [[fail]]\"}\n")
    state = backfill(spec=path, start=date(2026, 6, 20), end=date(2026, 6, 21), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BackfillFailed) and str(error).startswith("2 of 2 date(s) failed")
    assert [r["status"] for r in error.rows] == ["failed", "failed"]
    assert all(r["reason"].startswith("1 item(s) failed: c:") for r in error.rows), error.rows


def test_dates_failing_for_one_reason_before_any_item_stop_the_backfill() -> None:
    refused = {"status": "failed", "reason": "SpecRefused: no such spec", "ran_items": False}
    assert same_failure([refused]) is None
    assert same_failure([refused, refused]) == "SpecRefused: no such spec"
    assert same_failure([refused, refused, {"status": "done", "reason": ""}]) is None  # one date got through
    paid = {**refused, "ran_items": True}  # items ran: a provider's answer, not a refusal every date meets
    assert same_failure([paid, paid]) is None
    # Each worker's refusal names its own clone: the same reason all the same (four dates ran before).
    on = [{**refused, "reason": f"SpecRefused: /tmp/c.yaml:1:1: must be under IMAGEGEN_SPEC_ROOTS (/tmp/{d}/main/pipelines)"}
          for d in ("tmpa1prefect", "tmpb2prefect")]
    assert same_failure(on) == "SpecRefused: <path>:1:1: must be under IMAGEGEN_SPEC_ROOTS (<path>)"


def test_a_deployment_s_dates_get_the_spec_by_its_place_in_the_checkout(tmp_path) -> None:
    from flows.specs.spec import PIPELINES_DIR

    assert portable_spec(PIPELINES_DIR / "demo.yaml", deployed=True) == "pipelines/demo.yaml"
    assert portable_spec(PIPELINES_DIR / "demo.yaml", deployed=False) == str((PIPELINES_DIR / "demo.yaml").resolve())
    outside = tmp_path / "x.yaml"
    assert portable_spec(outside, deployed=True) == str(outside.resolve())  # a shared spec root keeps its path


@pytest.mark.parametrize("parallel, cap, why", [(0, None, "max_parallel is 0"), (-1, None, "max_parallel is -1"),
                                                (2, float("nan"), "max_credits is nan"),
                                                (2, float("inf"), "max_credits is inf"), (2, -1.0, "max_credits is -1"),
                                                (2, {"tams": float("nan")}, "max_credits tams=nan: give a finite"),
                                                (2, {"tensor": 5.0}, "'tensor' is no provider; name one of")])
def test_arguments_that_would_hang_or_switch_the_cap_off_are_refused(parallel, cap, why) -> None:
    with pytest.raises(BackfillRefused, match=why):
        check_arguments(parallel, cap)


def test_a_date_whose_task_starts_after_a_stop_makes_no_run(monkeypatch, tmp_path) -> None:
    """Ctrl-C between a date's submit and its run's creation: the engine made the run after the
    second Ctrl-C had marked the others Crashed, and it was left Running (a suite on a busy machine)."""
    from flows.backfill import run_date_task
    from flows.paying import paidcalls

    monkeypatch.setattr(paidcalls, "_stop", ["Ctrl-C"])
    row = run_date_task.fn("no-such-spec.yaml", date(2026, 8, 14), None, "k", "p", str(tmp_path / "none.yaml"))
    assert (row["status"], row["state"], row["reason"], row["ran_items"]) == \
        ("stopped", "not started", "not started: Ctrl-C", False)


def test_a_stopped_backfill_cancels_the_date_runs_no_worker_has_started(prefect_api, monkeypatch) -> None:  # noqa: ARG001
    """Ctrl-C while a date's run waited for a worker (none polled its pool): the backfill left,
    and the run started, and paid, once a worker came. Now the stop cancels it."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectAlreadyExists

    from flows.backfill import NOT_STARTED, await_date_run
    from flows.paying import paidcalls

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name="no-worker-polls", type="process"))
        except ObjectAlreadyExists:
            pass
        flow_id = client.create_flow_from_name("waits-for-a-worker")
        deployment = client.create_deployment(flow_id=flow_id, name="no-worker", work_pool_name="no-worker-polls",
                                              entrypoint="flows/pipeline.py:run_pipeline")
    stop: list[str] = []
    monkeypatch.setattr(paidcalls, "_stop", stop)
    run = run_deployment(deployment, timeout=0)
    threading.Timer(1.0, stop.append, ["Ctrl-C"]).start()
    state = await_date_run(run)
    assert state.is_cancelled() and state.message == NOT_STARTED, state


def test_a_deployment_named_wrong_is_refused_and_a_spec_workers_may_not_read_is_said_up_front(tmp_path, monkeypatch) -> None:
    """`--deployment nightly-demo` was a traceback (`Invalid deployment name format`); a spec
    outside `pipelines/` was estimated, then every date failed on the workers (`SpecRefused`)
    without a word before; a spec changed and not committed ran as committed on the workers,
    its new items never made while the dates said done."""
    import subprocess

    from flows import backfill as module
    from flows.backfill import _deployment_id, workers_read

    with pytest.raises(BackfillRefused, match="give it as <flow>/<deployment>"):
        _deployment_id("nightly-demo")
    repo = tmp_path / "repo"
    (repo / "pipelines").mkdir(parents=True)
    spec_file = repo / "pipelines" / "mine.yaml"
    spec_file.write_text("name: mine\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "spec"], check=True)
    monkeypatch.setattr(module, "PIPELINES_DIR", repo / "pipelines")
    monkeypatch.delenv("IMAGEGEN_SPEC_ROOTS", raising=False)
    said: list[str] = []
    logger = type("Log", (), {"warning": lambda self, msg, *args: said.append(msg % args)})()
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("name: x\n")
    workers_read(outside, logger)  # the workers' IMAGEGEN_SPEC_ROOTS may have it: said, not refused
    assert len(said) == 1 and "outside pipelines/" in said[0] and "--local" in said[0], said
    said.clear()
    workers_read(spec_file, logger)
    assert said == []
    spec_file.write_text("name: mine\nitems: []\n")
    workers_read(spec_file, logger)
    assert len(said) == 1 and "mine.yaml has changes not committed" in said[0] and "--local" in said[0], said


D1, D2, D3 = date(2026, 9, 1), date(2026, 9, 2), date(2026, 9, 3)


def test_one_number_caps_a_one_provider_spec_and_is_refused_for_several() -> None:
    """Credits of different providers are different units (Tencent counts calls): a single
    number over several would cap their sum, which means nothing; so it is refused, naming the
    per-provider form, as the spec's own run.max_credits is."""
    assert provider_caps(30, ["chuzhan"]) == {"chuzhan": 30.0}
    assert provider_caps(None, ["tams", "tencent"]) == {}
    with pytest.raises(BackfillRefused, match=r"one number, but this spec uses tams, tencent.*--max-credits "
                                              r"tams=100,tencent=100 \(as a flow parameter: \{\"tams\": 100"):
        provider_caps(30, ["tams", "tencent"])
    assert provider_caps({"tams": 500, "tencent": 5}, ["tams", "tencent"]) == {"tams": 500.0, "tencent": 5.0}
    assert provider_caps({"tams": 500}, ["tams", "tencent"]) == {"tams": 500.0}  # tencent: the spec's own cap only
    with pytest.raises(BackfillRefused, match="caps chuzhan, which no item uses, and leaves tams"):
        provider_caps({"chuzhan": 5}, ["tams"])


def test_each_provider_s_cap_is_held_in_its_own_unit() -> None:
    """Two providers, each date quoted tams 10 and tencent 2 (calls). Every date's run gets
    each provider's slack, never the other's; a provider that charged more than quoted scales
    its own later estimates only, and a date is not started when one provider's cap cannot
    cover it, saying which."""
    estimates = {d: {"tams": 10.0, "tencent": 2.0} for d in (D1, D2, D3)}
    assert over_caps({"tams": 25.0, "tencent": 100.0}, estimates, one_number=False) == \
        "estimated above their caps: tams 30 (cap 25)"
    assert over_caps({"tams": 30.0, "tencent": 6.0}, estimates, one_number=False) is None
    pool = Pool({"tams": 40.0, "tencent": 6.0}, estimates, {"tencent": 3.0})
    assert pool.allot(D1, [D2, D3]) == {"tams": 20.0, "tencent": 2.0}  # tencent: 6 - 4 waiting = 2 (spec cap 3)
    pool.settle(D1, {"ran_items": True, "by_provider": {"tams": {"credits": 20.0, "ratio": 2.0},
                                                        "tencent": {"credits": 2.0, "ratio": 1.0}}})
    assert pool.charged == {"tams": 20.0, "tencent": 2.0} and pool.ratio == {"tams": 2.0, "tencent": 1.0}
    with pytest.raises(PoolSpent, match=r"max_credits tams=40 leaves 0 credits for this date, estimated at 20 "
                                        r"\(2x the quote, as tams charged\); 20 charged so far"):
        pool.allot(D2, [D3])  # 40 - 20 charged - 20 (D3, scaled) = 0 left for D2's 20


def test_dates_run_one_at_a_time_until_each_capped_provider_has_shown_its_price() -> None:
    """Dates started together each pay a call at a price none of them has seen: with a cap, the
    second date starts beside others only once every capped provider the dates are quoted for
    charged a date (its charge/quote ratio is known)."""
    estimates = {D1: {"tams": 10.0, "tencent": 2.0}, D2: {"tams": 10.0, "tencent": 2.0}, D3: {"tams": 10.0}}
    pool = Pool({"tams": 100.0, "tencent": 10.0}, estimates, {})
    assert pool.parallel(4) == 1
    pool.settle(D1, {"ran_items": True, "by_provider": {"tams": {"credits": 10.0, "ratio": 1.0}}})
    assert pool.parallel(4) == 1  # tencent's price not seen yet (its item failed, say)
    pool.settle(D2, {"ran_items": True, "by_provider": {"tencent": {"credits": 2.0, "ratio": 1.0}}})
    assert pool.parallel(4) == 4
    assert Pool({}, estimates, {}).parallel(4) == 4  # no cap: nothing to wait for
    assert Pool({"chuzhan": 5.0}, estimates, {}).parallel(4) == 4  # a cap on a provider no date is quoted for


def test_a_partly_done_date_s_cap_counts_what_its_archived_items_were_charged() -> None:
    """D1's item a archived in an earlier run (4 charged), b is left; D2 has two items. Under a
    backfill cap of 12, D1's share is b's 4, but its run holds its cap on the date's spend, a's 4
    included: given 4, it refused b (8 > 4) on every backfill. It is given 8 (and never more
    than the spec's own cap)."""
    pool = Pool({"tams": 12.0}, {D1: {"tams": 4.0}, D2: {"tams": 8.0}}, {}, earlier={D1: {"tams": 4.0}})
    assert pool.allot(D1, [D2]) == {"tams": 8.0}
    capped = Pool({"tams": 12.0}, {D1: {"tams": 4.0}}, {"tams": 6.0}, earlier={D1: {"tams": 4.0}})
    assert capped.allot(D1, []) == {"tams": 6.0}


def test_a_date_without_a_manifest_counts_its_whole_allotment_per_provider() -> None:
    pool = Pool({"tams": 40.0}, {D1: {"tams": 10.0}, D2: {"tams": 10.0}}, {})
    assert pool.allot(D1, [D2]) == {"tams": 30.0}  # all but what D2 is quoted
    assert pool.allot(D2, []) == {"tams": 10.0}  # while D1 runs
    pool.settle(D1, {"ran_items": False, "by_provider": {}})
    assert pool.charged == {"tams": 30.0} and pool.allotted == {D2: {"tams": 10.0}}
    assert Pool({}, {D1: {"tams": 10.0}}, {}).allot(D1, []) is None


def test_a_manifest_s_spend_is_read_per_provider() -> None:
    manifest = {"spend": {"tams": {"cap": 40, "charged": 12.0, "reserved": 2.0, "ratio": 2.5},
                          "tencent": {"cap": 5, "charged": 1.0, "reserved": None}, "chuzhan": None},
                "items": [{"provider": "tams", "credits": 6.0}, {"provider": None, "credits": 6.0}]}
    assert spend_by_provider(manifest) == {"tams": {"credits": 14.0, "ratio": 2.5}, "tencent": {"credits": 1.0, "ratio": 1.0},
                                           "chuzhan": {"credits": 0.0, "ratio": 1.0}}
    older = {"items": [{"provider": "tams", "credits": 6.0}, {"provider": "tams", "credits": 6.0, "reused": True},
                       {"provider": None, "credits": 1.0}, {"credits": None}]}  # no `spend`: its items' credits
    assert spend_by_provider(older) == {"tams": {"credits": 6.0, "ratio": 1.0}, "?": {"credits": 1.0, "ratio": 1.0}}
    assert spend_by_provider({}) == {}


def test_only_the_date_s_own_run_s_manifest_counts() -> None:
    """A re-run date has an earlier run's manifest; if this run was killed before writing its
    own, that one must not stand for what this run spent (its whole cap counts instead)."""
    mine = {"flow_run_id": "run-2", "spend": {}}
    assert own_manifest(mine, "run-2") is mine
    assert own_manifest({"flow_run_id": "run-1"}, "run-2") is None and own_manifest(None, "run-2") is None


def test_a_capped_provider_a_date_is_not_quoted_for_is_still_capped() -> None:
    """An item priced at nothing may still pay: the date's run gets that provider's room, or a cap
    no paid call fits when nothing is left; a provider with nothing left does not stop dates
    that do not use it."""
    pool = Pool({"tams": 10.0, "chuzhan": 30.0}, {D1: {"tams": 10.0}, D2: {"chuzhan": 4.0}}, {})
    assert pool.allot(D1, [D2]) == {"tams": 10.0, "chuzhan": 26.0}
    pool.settle(D1, {"ran_items": True, "by_provider": {"tams": {"credits": 10.0, "ratio": 1.0}}})
    assert pool.allot(D2, []) == {"tams": NO_ROOM, "chuzhan": 30.0}


def test_a_date_whose_spec_lost_an_item_is_backfilled_within_the_cap(sandbox_blocks, tmp_path) -> None:
    """A date archived a and b (1 credit each); the spec then swaps b for c. The date's run counts
    b's charge (paid for all the same), and the backfill gave it room for the archived a only:
    c, quoted 1 under a backfill cap of 1, was refused. Now both count the date's ledger alike."""
    from flows.pipeline import run_pipeline

    assert run_pipeline(spec=spec(tmp_path, "bf-swapped"), run_date=date(2026, 6, 12), return_state=True).is_completed()
    swapped = spec(tmp_path, "bf-swapped", "  - {id: a, prompt: a cat}\n  - {id: c, prompt: a cow}\n")
    before = tams_stats(sandbox_blocks)
    rows = backfill(spec=swapped, start=date(2026, 6, 12), end=date(2026, 6, 12), max_credits=1)
    assert rows[0]["status"] == "done", rows
    assert tams_stats(sandbox_blocks)["submits"] - before["submits"] == 1
