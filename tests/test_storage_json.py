"""The JSON documents written to the archive (the run's manifest, its perceptual hashes): the
bytes `json.dumps` would give, without holding every piece of the text at once."""

from __future__ import annotations

import json
import tracemalloc
from datetime import date

from flows.storage import json_bytes


def manifest_like(items: int) -> dict:
    """A manifest's shape: one entry per item, each with an object, its checks and its verdict."""
    return {"pipeline": "bulk", "run_date": date(2026, 12, 4), "items": [
        {"item": f"item-{n:05d}", "provider": "tams", "credits": 1.5, "reused": False, "objects": [{
            "index": 1, "s3_uri": f"s3://archive/bulk/2026-12-04/item-{n:05d}-1.png", "sha256": "a" * 64,
            "verdict": "approved", "reasons": [], "checks": {"stddev": {"value": 45.3, "threshold": 2.0},
                                                            "size": {"value": "1024x1024", "threshold": None}}}]}
        for n in range(items)]}


def test_the_bytes_are_those_of_json_dumps() -> None:
    """Indented, keys sorted, dates and other values as `str`, non-ASCII escaped as dumps does."""
    document = {"z": [1, 2.5, None, True, {}, []], "a": {"when": date(2026, 12, 4), "名": "触站AI ✓"},
                "big": [{"k": n, "s": "x" * n} for n in range(5000)]}
    assert json_bytes(document) == json.dumps(document, indent=2, sort_keys=True, default=str).encode()
    assert json_bytes([]) == b"[]" and json_bytes("x") == b'"x"'


def test_a_large_manifest_is_encoded_in_about_its_own_size() -> None:
    """A 3,000-item manifest (about 1.9 MB of text): the memory in use while it is encoded peaks at
    under twice the bytes written, where `json.dumps` with `indent` held about six times that."""
    document = manifest_like(3000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        data = json_bytes(document)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(data) > 1_500_000
    assert peak < 2 * len(data), f"{peak} bytes at peak for {len(data)} written"
