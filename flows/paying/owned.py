"""Keys belong to one pipeline: image and sidecar writes never overwrite another's object.

Every image and sidecar is written conditionally. A new object is created only if absent
(`If-None-Match: *`): that is the first try, with no look before it, since most keys are new.
Where one exists (the server answers 412), it is overwritten only when it is this pipeline's and
this item's: its own metadata says so (`imagegen-pipeline`, `imagegen-item`, written with
every object since issue 25), or, for an object without them, its sidecar names the same
pipeline and item. The overwrite is conditional on the ETag read (`If-Match`), so an object
that changes meanwhile is looked at again instead of overwritten. Anything else raises
`KeyTaken`, and the object stays byte for byte as it was.

On an S3 server without conditional writes (501, see `flows.storage.put_conditionally`) the
first try writes nothing, and the owner is checked before every write from then on, but a
writer between the check and the write is not seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flows.paying import stalled
from flows.storage import (NotConditional, PreconditionFailed, conditional_writes, head, put_conditionally, read_object,
                           sidecar_key)

ATTEMPTS = 3  # an object that changes between the look and the write is looked at again


class KeyTaken(RuntimeError):
    """An archive key holds an object another pipeline or item (or an unknown writer) wrote."""


@dataclass(frozen=True)
class Owner:
    """Who writes an object: a pipeline's item."""

    pipeline: str
    item: str

    def metadata(self, **more: str) -> dict[str, str]:
        return {"imagegen-pipeline": self.pipeline, "imagegen-item": self.item, **more}


def put_owned(bucket: Any, key: str, body: bytes, owner: Owner, *, content_type: str,
              metadata: dict[str, str] | None = None) -> str:
    """Write `body` at `key` unless another owner's object is there (`KeyTaken`); return the ETag.
    While it waits for S3 the run's progress line can say so (`stalled`)."""
    with stalled.waiting_on(f"archive write {key}"):
        return _put_owned(bucket, key, body, owner, content_type=content_type, metadata=metadata)


def _put_owned(bucket: Any, key: str, body: bytes, owner: Owner, *, content_type: str,
               metadata: dict[str, str] | None) -> str:
    put = {"content_type": content_type, "metadata": owner.metadata(**(metadata or {}))}
    if conditional_writes(bucket):
        try:  # a new key: created if still absent, with no look first
            return put_conditionally(bucket, key, body, if_match=None, unconditional=False, **put)
        except (PreconditionFailed, NotConditional):
            pass  # something is there (whose?), or the server would overwrite it: look first
    for _ in range(ATTEMPTS):
        etag = _etag_if_ours(bucket, key, owner)  # None: no object (any more)
        try:
            return put_conditionally(bucket, key, body, if_match=etag, **put)
        except PreconditionFailed:
            continue  # created or changed since the look: look again
    raise KeyTaken(f"s3://{bucket.bucket_name}/{key} kept changing while {owner.pipeline} {owner.item} wrote it; "
                   "not overwritten")


def _etag_if_ours(bucket: Any, key: str, owner: Owner) -> str | None:
    """The ETag of the object at `key` when it is `owner`'s, None when there is none;
    `KeyTaken` when it is someone else's."""
    found = head(bucket, key)
    if found is None:
        return None
    meta = found.get("Metadata") or {}
    if "imagegen-pipeline" in meta:
        claimed = (meta.get("imagegen-pipeline"), meta.get("imagegen-item"))
        how = "its metadata"
    else:
        sidecar = _read_json(bucket, sidecar_key(key)) or {}
        claimed, how = (sidecar.get("pipeline"), sidecar.get("item")), "its sidecar"
    if claimed == (owner.pipeline, owner.item):
        return str(found["ETag"])
    who = f"pipeline {claimed[0]!r}, item {claimed[1]!r}" if claimed[0] else "a writer nothing names"
    raise KeyTaken(f"s3://{bucket.bucket_name}/{key} holds an object of {who} ({how}); {owner.pipeline} "
                   f"{owner.item} does not overwrite it")


def _read_json(bucket: Any, key: str) -> dict[str, Any] | None:
    """The JSON object at `key`; None when absent or not a JSON object."""
    answer = read_object(bucket, key)
    if answer is None:
        return None
    try:
        found = json.loads(answer[0])
    except ValueError:
        return None
    return found if isinstance(found, dict) else None
