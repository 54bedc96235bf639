"""The archive is the last word: what is in the bucket decides what was paid and what is listed.

Before paying, an item whose images and sidecars for its request are in the bucket is paid,
whether or not its ledger record survived (`found_in_archive`): each sidecar must name the
pipeline, the item, the request (any attempt of it) and the provider's job, and the image
beside it must have the size and sha256 the sidecar says. An item the ledger calls archived
whose objects are gone is not archived (`missing`): its job id lets the next run fetch it again
without paying. A manifest lists an item only once every object it names is listed in the
bucket with the size and ETag it was written with (`confirmed`).

Presence is read from listings, one per folder (`Listing`), not a request per key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flows.storage import head, list_objects, read_bytes, read_json, render_key, sidecar_key
from flows.models import ArchivedItem, ItemPlan


class ArchiveMissing(RuntimeError):
    """An object the ledger or this run archived is not in the bucket (or not as written)."""


class ArchivedImagesLost(RuntimeError):
    """An archived item's objects are gone, and the provider cannot give its job's results again."""


@dataclass(frozen=True, slots=True)
class Listed:
    size: int
    etag: str


class Listing:
    """What the bucket holds, listed one folder at a time (`Delimiter="/"`), each folder once."""

    def __init__(self, bucket: Any) -> None:
        self.bucket = bucket
        self._folders: dict[str, dict[str, Listed]] = {}
        self._manifests: dict[str, dict[str, dict[str, Any]]] = {}

    def manifest_items(self, key: str) -> dict[str, dict[str, Any]]:
        """The items of the manifest at `key`, by item id (read once; empty where there is none)."""
        if key not in self._manifests:
            manifest = read_json(self.bucket, key) if self.get(key) is not None else None
            items = manifest.get("items") if isinstance(manifest, dict) else None
            self._manifests[key] = {str(i.get("item")): i for i in items or [] if isinstance(i, dict)}
        return self._manifests[key]

    def get(self, key: str) -> Listed | None:
        folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        if folder not in self._folders:
            self._folders[folder] = dict(self._list(folder))
        return self._folders[folder].get(key)

    def _list(self, folder: str) -> Iterator[tuple[str, Listed]]:
        for obj in list_objects(self.bucket, folder, folder_only=True):
            yield obj["Key"], Listed(size=int(obj["Size"]), etag=str(obj.get("ETag", "")))


def key_of(uri: str, bucket_name: str) -> str:
    return uri.removeprefix(f"s3://{bucket_name}/")


def missing(item: ArchivedItem, listing: Listing) -> str | None:
    """Why `item` is not (wholly) in the bucket, or None. Objects written since issue 25 carry
    their size and ETag, and must still have them; older ones must be there."""
    name = listing.bucket.bucket_name
    if item.images is not None and len(item.objects) < item.images:
        return f"only {len(item.objects)} of its job's {item.images} image(s) are in the bucket"
    for obj in item.objects:
        if not obj.get("s3_uri"):
            continue  # dropped on purpose: never written
        found = listing.get(key_of(obj["s3_uri"], name))
        if found is None:
            return f"image {obj['s3_uri']} is not in the bucket"
        if obj.get("bytes") is not None and found.size != obj["bytes"]:
            return f"image {obj['s3_uri']} has {found.size} bytes, not the {obj['bytes']} archived"
        if obj.get("etag") and found.etag != obj["etag"]:
            return f"image {obj['s3_uri']} is not the object archived (ETag {found.etag}, not {obj['etag']})"
        if obj.get("sidecar") and listing.get(key_of(obj["sidecar"], name)) is None:
            return f"sidecar {obj['sidecar']} is not in the bucket"
    return None


def _candidates(plan: ItemPlan) -> Iterator[str]:
    """Every key an image of the item may have been archived at: approved, quarantined, and
    quarantined by a release before issue 25."""
    archive = plan.archive
    for index in range(1, plan.request.count + 1):
        key = render_key(archive.key_template, pipeline=plan.pipeline, run_date=plan.run_date, item=plan.item_id,
                         index=index, provider=plan.provider)
        yield from (key, archive.quarantined(key), archive.legacy_quarantined(key))


def _names(doc: Any, plan: ItemPlan) -> bool:
    """The sidecar is of this pipeline's item and request (any attempt), with a job and a digest."""
    base = plan.request.request_id
    rid = str(doc.get("request_id") or "") if isinstance(doc, dict) else ""
    return (rid == base or rid.startswith(base + "-")) and doc.get("pipeline") == plan.pipeline \
        and doc.get("item") == plan.item_id and bool(doc.get("provider_job_id")) and bool(doc.get("sha256"))


def _same_bytes(bucket: Any, key: str, doc: dict[str, Any], listed: Listed) -> bool:
    """The image at `key` is the one the sidecar describes: its size, and its sha256 (from its
    metadata where it was written with one, else read and hashed)."""
    if listed.size != doc.get("bytes"):
        return False
    meta = (head(bucket, key) or {}).get("Metadata") or {}
    digest = meta.get("sha256")
    if digest is None:
        digest = hashlib.sha256(read_bytes(bucket, key)).hexdigest()
    return digest == doc["sha256"]


@dataclass(frozen=True)
class Found:
    """An item as its sidecars in the bucket show it (or, `source`, the date's manifest)."""

    item: ArchivedItem
    request_id: str
    complete: bool
    source: str = "the archive's sidecars"


def found_in_archive(plan: ItemPlan, listing: Listing) -> Found | None:
    """The item as the sidecars in the bucket that name its request show it; None when none
    does. Its objects are the images beside them with the sidecar's size and sha256; its job
    is the latest one they name (known even where its images are gone, so they are fetched
    again, not paid again). `complete` when every image of that job is there."""
    bucket = listing.bucket
    docs: list[tuple[dict[str, Any], str, Listed | None]] = []
    for key in _candidates(plan):
        sidecar = sidecar_key(key)
        if listing.get(sidecar) is None or not _names(doc := read_json(bucket, sidecar), plan):
            continue
        listed = listing.get(key)
        docs.append((doc, sidecar, listed if listed is not None and _same_bytes(bucket, key, doc, listed) else None))
    if not docs:
        return None
    docs.sort(key=lambda found: str(found[0].get("archived_at") or ""), reverse=True)
    latest = docs[0][0]
    by_index: dict[int, dict[str, Any]] = {}
    for doc, sidecar, listed in docs:
        if listed is None or doc["provider_job_id"] != latest["provider_job_id"] or doc.get("index") in by_index:
            continue
        by_index[doc["index"]] = _object(doc, f"s3://{bucket.bucket_name}/{sidecar}", listed)
    item = ArchivedItem(item_id=plan.item_id, provider=plan.provider, job_id=str(latest["provider_job_id"]),
                        credits=float(latest.get("job_credits") or 0.0),
                        credits_source=str(latest.get("credits_source") or "formula"),
                        objects=[by_index[n] for n in sorted(by_index)],
                        images=int(latest.get("images_in_job") or plan.request.count))
    return Found(item=item, request_id=str(latest["request_id"]), complete=missing(item, listing) is None)


def dropped_in_manifest(plan: ItemPlan, listing: Listing) -> Found | None:
    """An item whose every image the review rejected and `quarantine: drop` left unwritten:
    no sidecar names it, so once its ledger record is lost only the date's manifest says its
    job ran and was archived so. Its entry there (this request and provider, every object
    dropped, no error) is the item: not paid for again. None otherwise."""
    entry = listing.manifest_items(plan.archive.manifest_key(plan.pipeline, plan.run_date)).get(plan.item_id)
    if not entry or entry.get("error") or entry.get("request_id") != plan.request.request_id:
        return None
    objects = entry.get("objects") or []
    if entry.get("provider") != plan.provider or not entry.get("job_id") or not objects or not all(
            isinstance(o, dict) and o.get("dropped") and not o.get("s3_uri") for o in objects):
        return None
    item = ArchivedItem(item_id=plan.item_id, provider=plan.provider, job_id=str(entry["job_id"]),
                        credits=float(entry.get("credits") or 0.0),
                        credits_source=str(entry.get("credits_source") or "formula"), objects=objects,
                        images=len(objects))
    return Found(item=item, request_id=plan.request.request_id, complete=True,
                 source="the date's manifest (the review dropped every image: quarantine: drop)")


def _object(doc: dict[str, Any], sidecar_uri: str, listed: Listed) -> dict[str, Any]:
    """A manifest object from its sidecar and the image's listing."""
    review = doc.get("review") or {}
    phash = ((review.get("checks") or {}).get("phash") or {}).get("value")
    return {"index": doc["index"], "s3_uri": doc.get("s3_uri"), "sidecar": sidecar_uri, "sha256": doc["sha256"],
            "bytes": listed.size, "etag": listed.etag, "phash": phash, "verdict": doc.get("verdict"),
            "reasons": review.get("reasons") or []}


def confirmed(outcome: tuple[Any, dict[str, str] | None], listing: Listing) -> tuple[Any, dict[str, str] | None]:
    """An archived outcome as it is, or the item failed (`ArchiveMissing`) when an object it names
    is not in the bucket as it was written."""
    result, _ = outcome
    why = missing(result, listing) if isinstance(result, ArchivedItem) else None
    if why is None:
        return outcome
    return None, {"step": "archive", "error": ArchiveMissing.__name__,
                  "message": f"{why} (written, then lost); the next run archives it again from job "
                             f"{result.job_id}, fetched again without paying where {result.provider} "
                             "gives its results again"}
