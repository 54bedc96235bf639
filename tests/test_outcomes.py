"""Ended items' outcomes held in one buffer until the manifest (`flows.running.settle.Outcomes`):
each read back as it was kept, archived or failed, in the order kept."""

from __future__ import annotations

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
    assert len(kept) == 300
    found = kept.read()
    assert list(found) == list(expected) and found == expected
    assert kept.read() == expected  # reading does not consume
    kept.keep("one-more", (None, {"step": "review", "error": "X", "message": "m"}))  # still writable after a read
    assert len(kept.read()) == 301


def test_an_outcome_pickle_cannot_write_is_kept_as_it_is() -> None:
    kept = Outcomes()
    kept.keep("a", (None, {"step": "generate", "error": "E", "message": "m"}))
    odd = (lambda: None, None)  # a lambda does not pickle
    kept.keep("b", odd)
    kept.keep("c", (None, {"step": "review", "error": "F", "message": "n"}))
    found = kept.read()
    assert list(found) == ["a", "b", "c"] and found["b"] is odd and found["c"][1]["error"] == "F"
