"""The archive is the last word, and keys belong to one pipeline (issue 25, items 5 and 6).

On the sandbox's SeaweedFS and the three emulators: a lost ledger pays nothing again (the
sidecars in the bucket say what was paid); an archived image lost from the bucket is fetched
again from its job, not paid again; a manifest never lists an object the bucket does not
hold; another pipeline's quarantine never overwrites a paid image. Money is asserted on the
emulators' own counts (`charges`, `submits`, `requests`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path

import pytest

from flows.storage import archive_bucket
from flows.paying.archived import Listing, confirmed
from flows.paying.owned import KeyTaken, Owner, put_owned
from flows.models import ArchivedItem
from tests.conftest import TEST_BUCKET, run_spec, s3_client
from tests.test_limits_and_faults import manifest_of
from tests.test_pay_once import (PROVIDERS, charges, emulators, ledger_states, once_each, spec_text,  # noqa: F401
                                 stats, write_spec)


def delete_prefix(state, prefix: str) -> list[str]:
    """Delete every object under `prefix`, as a lost ledger (or a recreated bucket) leaves it."""
    s3 = s3_client(state)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=TEST_BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    for key in keys:
        s3.delete_object(Bucket=TEST_BUCKET, Key=key)
    return keys


def object_bytes(state, key: str) -> bytes:
    return s3_client(state).get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()


def counters(state, provider: str) -> dict[str, int]:
    now = stats(state, provider)
    return {"submits": now["submits"], "requests": now["requests"]}


QUARANTINED = ("tams", "quarantined")  # every image rejected (blank threshold above any image): quarantined
DROPPED = ("tencent", "dropped")  # every image rejected, and `quarantine: drop`: no object, no sidecar


# --- (a) a lost ledger --------------------------------------------------------------------------------

@pytest.mark.parametrize(("provider", "kind"), [(p, "approved") for p in PROVIDERS] + [QUARANTINED, DROPPED])
def test_a_lost_ledger_pays_nothing_again(emulators, tmp_path, provider, kind) -> None:
    """The whole `_jobs/` ledger of a date is gone after its run. The rerun finds every item's
    images and sidecars (request id, job id, sha256) in the bucket: it sends no request at all
    to the provider, writes the records back (archived), and its manifest is complete. Where
    the review dropped every image (`quarantine: drop`) nothing names the item but the date's
    manifest, which the rerun reads: it paid for each item again before."""
    name, day = f"lost-ledger-{provider}-{kind}", date(2026, 7, 20)
    text = spec_text(provider, name, 3)
    if kind in ("quarantined", "dropped"):
        text = text.replace("archive: {" if kind == "dropped" else "archive:", "review: {min_stddev: 1000}\narchive:" +
                            (" {quarantine: drop, " if kind == "dropped" else ""))
    path = write_spec(tmp_path, text, name)
    first = run_spec(tmp_path, text, day, path=path)
    assert first.is_completed(), manifest_of(first)
    assert charges(emulators, provider, name) == once_each(name, 3)
    lost = delete_prefix(emulators, f"{name}/{day}/_jobs/")
    assert sorted(k.rsplit("/", 1)[1] for k in lost) == ["_run.json", "i0.json", "i1.json", "i2.json"]
    before = counters(emulators, provider)
    again = run_spec(tmp_path, text, day, path=path)
    manifest = manifest_of(again)
    assert again.is_completed(), manifest
    assert counters(emulators, provider) == before, "the rerun asked the provider for something"
    assert charges(emulators, provider, name) == once_each(name, 3)
    assert manifest["status"] == "complete" and manifest["totals"]["reused_items"] == 3
    assert [i["job_id"] for i in manifest["items"]] == [i["job_id"] for i in manifest_of(first)["items"]]
    assert {o["verdict"] for i in manifest["items"] for o in i["objects"]} == \
        {"approved" if kind == "approved" else "rejected"}
    assert set(ledger_states(path, day).values()) == {"archived"}  # rebuilt from the sidecars


# --- (b) an archived image lost from the bucket ---------------------------------------------------------

@pytest.mark.parametrize("ledger", ["kept", "lost"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_image_lost_from_the_archive_is_fetched_again_not_paid_again(emulators, tmp_path, provider,
                                                                        ledger) -> None:
    """After a run, one item's image is deleted from the bucket (its sidecar stays), with or
    without the whole ledger. The rerun sees it missing (absent: not archived), and the job id
    (from the ledger, or from the sidecar that names the request) lets it poll the job again
    and archive the image again: no submit, each image charged once, the sidecar rewritten
    in place (its own pipeline's and item's, so the conditional overwrite allows it)."""
    name, day = f"lost-image-{provider}-{ledger}", date(2026, 7, 21)
    path = write_spec(tmp_path, spec_text(provider, name, 2), name)
    first = run_spec(tmp_path, path.read_text(), day, path=path)
    assert first.is_completed(), manifest_of(first)
    image = f"{name}/{day}/i0-1.png"
    digest = hashlib.sha256(object_bytes(emulators, image)).hexdigest()
    delete_prefix(emulators, image)
    if ledger == "lost":
        delete_prefix(emulators, f"{name}/{day}/_jobs/")
    submits = stats(emulators, provider)["submits"]
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    manifest = manifest_of(again)
    assert again.is_completed(), manifest
    assert stats(emulators, provider)["submits"] == submits
    assert charges(emulators, provider, name) == once_each(name, 2)
    i0, i1 = manifest["items"]
    assert not i0["reused"] and i1["reused"]
    assert i0["job_id"] == manifest_of(first)["items"][0]["job_id"]
    assert hashlib.sha256(object_bytes(emulators, image)).hexdigest() == i0["objects"][0]["sha256"] == digest
    sidecar = json.loads(object_bytes(emulators, f"{name}/{day}/i0-1.json"))
    assert sidecar["sha256"] == i0["objects"][0]["sha256"] and sidecar["provider_job_id"] == i0["job_id"]
    assert set(ledger_states(path, day).values()) == {"archived"}


def test_an_image_lost_before_the_manifest_is_not_listed(emulators, tmp_path, monkeypatch) -> None:
    """An image written, then lost before the manifest is written (a bucket recreated mid-run):
    the manifest does not list it, the item fails `ArchiveMissing` with its reason and what it
    cost, the run fails; the rerun fetches it again from its job, paying nothing again."""
    import flows.pipeline

    name, day = "lost-before-manifest", date(2026, 7, 22)
    path = write_spec(tmp_path, spec_text("chuzhan", name, 2), name)
    unstage = flows.pipeline.unstage

    def lose_one_image(spec, keys) -> None:
        delete_prefix(emulators, f"{name}/{day}/i0-1.png")
        unstage(spec, keys)

    monkeypatch.setattr(flows.pipeline, "unstage", lose_one_image)
    first = run_spec(tmp_path, path.read_text(), day, path=path)
    monkeypatch.setattr(flows.pipeline, "unstage", unstage)
    manifest = manifest_of(first)
    assert first.is_failed() and manifest["status"] == "partial"
    i0, i1 = manifest["items"]
    assert i0["error"]["error"] == "ArchiveMissing" and f"{name}/{day}/i0-1.png" in i0["error"]["message"]
    assert i0["objects"] == [] and i0["credits"] > 0 and "paid" in i0["charge"]
    assert manifest["totals"]["images"] == 1 and not i1.get("error")
    again = run_spec(tmp_path, path.read_text(), day, path=path)
    assert again.is_completed(), manifest_of(again)
    assert charges(emulators, "chuzhan", name) == once_each(name, 2)


def test_a_manifest_lists_only_objects_as_written(emulators) -> None:
    """`confirmed` on the real bucket: an object as written passes; one overwritten with
    other bytes, or deleted, fails its item with the reason."""
    bucket = archive_bucket(TEST_BUCKET, "sandbox")
    key = "confirm-check/2026-07-23/a-1.png"
    etag = put_owned(bucket, key, b"png" * 10, Owner("confirm-check", "a"), content_type="image/png")
    put_owned(bucket, key.replace(".png", ".json"), b"{}", Owner("confirm-check", "a"),
              content_type="application/json")
    item = ArchivedItem(item_id="a", provider="tams", job_id="j", credits=1.0, credits_source="formula", images=1,
                        objects=[{"index": 1, "s3_uri": f"s3://{TEST_BUCKET}/{key}", "bytes": 30, "etag": etag,
                                  "sidecar": f"s3://{TEST_BUCKET}/{key.replace('.png', '.json')}"}])
    assert confirmed((item, None), Listing(bucket)) == (item, None)
    s3_client(emulators).put_object(Bucket=TEST_BUCKET, Key=key, Body=b"other" * 6)
    _, error = confirmed((item, None), Listing(bucket))
    assert error["error"] == "ArchiveMissing" and "not the object archived" in error["message"]
    delete_prefix(emulators, key)
    _, error = confirmed((item, None), Listing(bucket))
    assert "is not in the bucket" in error["message"]


# --- (c) keys belong to one pipeline ------------------------------------------------------------------

def test_another_pipelines_quarantine_cannot_reach_a_paid_image(emulators, tmp_path) -> None:
    """The issue's case: spec B's `quarantine_prefix` names spec A's folder, and before issue 25
    B's rejected image landed on A's paid image (`keys-a/keys-b/<date>/i0-1.png`). Both specs
    still validate; B's rejected image now goes under B's own prefix, and A's image and
    sidecar are byte for byte what A wrote, with the sha256 A's manifest lists."""
    day = date(2026, 7, 24)
    a_template = '"{pipeline}/keys-b/{run_date}/{item}-{index}.png"'
    a_text = spec_text("tams", "keys-a", 1).replace("credentials: sandbox}",
                                                      f"credentials: sandbox, key_template: {a_template}}}")
    b_text = spec_text("tams", "keys-b", 1).replace("credentials: sandbox}",
                                                      "credentials: sandbox, quarantine_prefix: keys-a}")
    b_text = b_text.replace("archive:", "review: {min_stddev: 1000}\narchive:")
    a_path, b_path = write_spec(tmp_path, a_text, "keys-a"), write_spec(tmp_path, b_text, "keys-b")
    a_state = run_spec(tmp_path, a_text, day, path=a_path)
    assert a_state.is_completed(), manifest_of(a_state)
    a_key = f"keys-a/keys-b/{day}/i0-1"
    before = {ext: object_bytes(emulators, f"{a_key}.{ext}") for ext in ("png", "json")}
    b_state = run_spec(tmp_path, b_text, day, path=b_path)
    assert b_state.is_completed(), manifest_of(b_state)
    (b_object,) = manifest_of(b_state)["items"][0]["objects"]
    assert b_object["verdict"] == "rejected"
    assert b_object["s3_uri"] == f"s3://{TEST_BUCKET}/keys-b/keys-a/{day}/i0-1.png"  # B's own prefix
    assert {ext: object_bytes(emulators, f"{a_key}.{ext}") for ext in ("png", "json")} == before
    a_listed = manifest_of(a_state)["items"][0]["objects"][0]["sha256"]
    assert hashlib.sha256(before["png"]).hexdigest() == a_listed


def test_an_object_another_pipeline_wrote_is_never_overwritten(emulators, tmp_path) -> None:
    """An object at a pipeline's own image key that another pipeline wrote (as a release
    before issue 25 could quarantine into it) is left byte for byte: the item fails `KeyTaken`
    with the key and the owner its sidecar names, and is not retried. The paid image stays
    known by its job (charged once)."""
    name, day = "keys-c", date(2026, 7, 25)
    key = f"{name}/{day}/i0-1"
    s3 = s3_client(emulators)
    foreign = {"png": b"not yours" * 10, "json": json.dumps({"pipeline": "keys-other", "item": "x"}).encode()}
    for ext, body in foreign.items():
        s3.put_object(Bucket=TEST_BUCKET, Key=f"{key}.{ext}", Body=body)
    path = write_spec(tmp_path, spec_text("tams", name, 1), name)
    state = run_spec(tmp_path, path.read_text(), day, path=path)
    manifest = manifest_of(state)
    assert state.is_failed()
    error = manifest["items"][0]["error"]
    assert error["error"] == "KeyTaken" and f"{key}.png" in error["message"] and "keys-other" in error["message"]
    assert {ext: object_bytes(emulators, f"{key}.{ext}") for ext in foreign} == foreign
    assert charges(emulators, "tams", name) == once_each(name, 1)


def test_put_owned_overwrites_only_its_own_objects(emulators) -> None:
    """On the real bucket: a pipeline rewrites its own item's object (If-Match on the ETag it
    read); another item's, another pipeline's or an unnamed object is refused untouched."""
    bucket = archive_bucket(TEST_BUCKET, "sandbox")
    key = "owned-check/2026-07-26/a-1.png"
    mine = Owner("owned-check", "a")
    first = put_owned(bucket, key, b"one", mine, content_type="image/png")
    second = put_owned(bucket, key, b"two", mine, content_type="image/png")
    assert first != second and object_bytes(emulators, key) == b"two"
    for other in (Owner("owned-check", "b"), Owner("someone-else", "a")):
        with pytest.raises(KeyTaken, match="owned-check"):
            put_owned(bucket, key, b"three", other, content_type="image/png")
    assert object_bytes(emulators, key) == b"two"
    s3_client(emulators).put_object(Bucket=TEST_BUCKET, Key="owned-check/2026-07-26/b-1.png", Body=b"legacy")
    with pytest.raises(KeyTaken, match="nothing names"):
        put_owned(bucket, "owned-check/2026-07-26/b-1.png", b"new", mine, content_type="image/png")
    assert object_bytes(emulators, "owned-check/2026-07-26/b-1.png") == b"legacy"
