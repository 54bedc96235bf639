"""Backfill: dates already complete are skipped, missing and partly failed ones run, the credit
cap refuses up front, a table artifact reports each date. Here without a deployment (subflows);
through a deployment and workers in test_server_e2e.py."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from flows.backfill import (BackfillFailed, BackfillRefused, backfill, check_arguments, dates_between, portable_spec,
                            same_failure)
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
    again = backfill(spec=path, start=date(2026, 6, 1), end=date(2026, 6, 5), max_parallel=2)
    assert [r["status"] for r in again] == ["skipped"] * 5
    assert tams_stats(sandbox_blocks)["requests"] == after["requests"]


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
    from prefect.client.orchestration import get_client

    backfill(spec=spec(tmp_path, "bf-art"), start=date(2026, 8, 1), end=date(2026, 8, 2))
    with get_client(sync_client=True) as client:
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


def test_a_deployment_s_dates_get_the_spec_by_its_place_in_the_checkout(tmp_path) -> None:
    from flows.specs.spec import PIPELINES_DIR

    assert portable_spec(PIPELINES_DIR / "demo.yaml", deployed=True) == "pipelines/demo.yaml"
    assert portable_spec(PIPELINES_DIR / "demo.yaml", deployed=False) == str((PIPELINES_DIR / "demo.yaml").resolve())
    outside = tmp_path / "x.yaml"
    assert portable_spec(outside, deployed=True) == str(outside.resolve())  # a shared spec root keeps its path


@pytest.mark.parametrize("parallel, cap, why", [(0, None, "max_parallel is 0"), (-1, None, "max_parallel is -1"),
                                                (2, float("nan"), "max_credits is nan"),
                                                (2, float("inf"), "max_credits is inf"), (2, -1.0, "max_credits is -1")])
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
