"""Ended items' outcomes held in one buffer until the manifest (`flows.running.settle.Outcomes`):
each read back as it was kept, archived or failed, in any order."""

from __future__ import annotations

import pytest

from flows.models import ArchivedItem
from flows.running.settle import Outcomes


def test_outcomes_are_read_back_as_they_were_kept() -> None:
    kept = Outcomes()
    expected = {}
    for n in range(300):
        archived = ArchivedItem(item_id=f"item-{n}", provider="tams", job_id=f"j-{n}", credits=1.5,
                                credits_source="charged", images=1,
                                objects=[{"index": 0, "s3_uri": f"s3://b/p/2026-01-01/item-{n}-0.png", "sha256": "a" * 64,
                                          "etag": '"e"', "reasons": ["ok"], "bytes": n}])
        outcome = (archived, None) if n % 7 else (None, {"step": "generate", "error": "ContentRejected",
                                                          "message": f"refused {n}"})
        kept.keep(f"item-{n}", outcome)
        expected[f"item-{n}"] = outcome
    assert len(kept) == 300 and "item-299" in kept and "item-300" not in kept
    assert all(kept.get(item) == outcome for item, outcome in reversed(expected.items()))
    assert kept.get("item-0") == expected["item-0"]  # reading does not consume
    kept.keep("one-more", (None, {"step": "review", "error": "X", "message": "m"}))  # still writable after a read
    assert len(kept) == 301 and kept.get("one-more")[1]["error"] == "X" and kept.get("item-7") == expected["item-7"]
    with pytest.raises(KeyError):
        kept.get("never-kept")


def test_an_outcome_pickle_cannot_write_is_kept_as_it_is() -> None:
    kept = Outcomes()
    kept.keep("a", (None, {"step": "generate", "error": "E", "message": "m"}))
    odd = (lambda: None, None)  # a lambda does not pickle
    kept.keep("b", odd)
    kept.keep("c", (None, {"step": "review", "error": "F", "message": "n"}))
    assert kept.get("b") is odd and kept.get("c")[1]["error"] == "F" and kept.get("a")[1]["error"] == "E"


def test_the_manifest_reads_each_outcome_as_it_makes_its_entry() -> None:
    """`build_manifest` asks for the next outcome only once the entry before it is made (a
    5,000-item run's end then holds its items once, as entries), and the entries of outcomes read
    back from pickles share their keys."""
    from datetime import date, datetime, timezone
    from types import SimpleNamespace

    from flows.pipeline import _outcomes
    from flows.running.report import build_manifest

    plans = [SimpleNamespace(item_id=f"item-{n}", provider="tams", request=SimpleNamespace(request_id=f"r{n}", seed=n))
             for n in range(6)]
    read, asked = [], []

    class Counted(Outcomes):
        def get(self, item: str):
            read.append(item)
            return super().get(item)

    kept = Counted()
    for n, plan in enumerate(plans):
        objects = [{"index": 0, "s3_uri": f"s3://b/{n}.png", "verdict": "approved", "reasons": []}]
        kept.keep(plan.item_id, (ArchivedItem(item_id=plan.item_id, provider="tams", job_id=f"j{n}", credits=1.0,
                                              credits_source="charged", objects=objects), None) if n % 2 else
                  (None, {"step": "generate", "error": "E", "message": f"m{n}"}))

    def charges(plan, error):
        asked.append((plan.item_id, len(read)))
        return None

    manifest = build_manifest(SimpleNamespace(name="p"), "p.yaml", "0", date(2026, 1, 1), plans,
                              _outcomes(plans, {}, {}, (kept, {})), datetime.now(timezone.utc), charges=charges)
    assert asked == [("item-0", 1), ("item-2", 3), ("item-4", 5)]
    first, second = [i["objects"][0] for i in manifest["items"] if i["objects"]][:2]
    assert first == {"index": 0, "s3_uri": "s3://b/1.png", "verdict": "approved", "reasons": []}
    assert all(a is b for a, b in zip(first, second, strict=True)) and first["verdict"] is second["verdict"]


def test_the_manifest_counts_each_provider_s_credits_in_its_own_unit() -> None:
    """TAMS credits and Tencent calls do not add up: `totals.credits_by_provider` keeps them
    apart (a failed item's maybe-charged cost included), and the run's line reads them so."""
    from datetime import date, datetime, timezone
    from types import SimpleNamespace

    from flows.running.report import build_manifest, credits_of

    plans = [SimpleNamespace(item_id=f"item-{n}", provider=p, request=SimpleNamespace(request_id=f"r{n}", seed=n))
             for n, p in enumerate(["tams", "tencent", "tams", "tencent"])]
    outcomes = [(ArchivedItem(item_id=p.item_id, provider=p.provider, job_id=f"j{n}", credits=2.5 if p.provider == "tams"
                              else 1.0, credits_source="charged", objects=[]), None) for n, p in enumerate(plans[:3])]
    outcomes.append((None, {"step": "generate", "error": "E", "message": "m"}))
    manifest = build_manifest(SimpleNamespace(name="p"), "p.yaml", "0", date(2026, 1, 1), plans, outcomes,
                              datetime.now(timezone.utc), charges=lambda plan, error: (1.0, "maybe charged"))
    assert manifest["totals"]["credits_by_provider"] == {"tams": 5.0, "tencent": 2.0}
    assert credits_of(manifest) == "credits tams 5, tencent 2"


def test_the_summary_table_gives_a_failed_item_s_error_a_column_of_its_own() -> None:
    """A failed item's error was printed under `s3_uri`, and cut there in the UI's table; then
    it had a column of its own, after the long `s3_uri`, off-screen in the UI; and its empty
    cells were `-`, which the UI renders (Markdown) as list bullets."""
    from flows.running.report import NO_CELL, format_table, summary_rows

    manifest = {"items": [
        {"item": "ok", "provider": "tams", "credits": 1.5,
         "objects": [{"index": 1, "verdict": "approved", "s3_uri": "s3://b/p/ok-1.png"}]},
        {"item": "broken", "provider": "tams", "credits": 0.0, "objects": [],
         "error": {"step": "generate", "error": "JobFailed", "message": "tams: FAILED: job 7 [[fail]] marker"}},
    ]}
    ok, broken = summary_rows(manifest)
    assert (ok["s3_uri"], ok["error"]) == ("s3://b/p/ok-1.png", "")
    assert (broken["verdict"], broken["s3_uri"], broken["index"]) == ("failed at generate: JobFailed", NO_CELL, NO_CELL)
    assert NO_CELL.strip("-*+ ") and not NO_CELL.isdigit()  # no Markdown list marker
    assert broken["error"] == "tams: FAILED: job 7 [[fail]] marker"
    header = format_table([ok, broken]).splitlines()[0].split()
    assert header == ["item", "index", "provider", "job_credits", "verdict", "error", "s3_uri"]
    [alone] = summary_rows({"items": manifest["items"][:1]})  # no failed item: no empty column
    assert list(alone) == ["item", "index", "provider", "job_credits", "verdict", "s3_uri"]


def test_a_job_s_credits_are_on_its_first_image_s_row_only() -> None:
    """Two images of one job: its credits once, so the column adds up to what was paid."""
    from flows.running.report import SAME_JOB, summary_rows

    item = {"item": "lamp", "provider": "tams", "credits": 3.0, "objects": [
        {"index": 1, "verdict": "approved", "s3_uri": "s3://b/p/lamp-1.png"},
        {"index": 2, "verdict": "approved", "s3_uri": "s3://b/p/lamp-2.png"}]}
    assert [row["job_credits"] for row in summary_rows({"items": [item]})] == [3.0, SAME_JOB]


def test_an_empty_cell_shows_as_a_dash() -> None:
    """A backfill's date that never started has no flow run: its cell read `None`."""
    from flows.running.report import format_table

    lines = format_table([{"date": "2026-01-01", "flow_run_id": None}, {"date": "2026-01-02", "flow_run_id": "abc"}])
    assert lines.splitlines()[1].split() == ["2026-01-01", "-"] and "None" not in lines
