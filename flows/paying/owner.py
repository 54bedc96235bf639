"""One name, one spec: the archive prefix `<pipeline>/` records which spec file owns it.

Two different spec files with the same `name` would share one archive prefix and one ledger,
and each would overwrite the other's images and manifests. The first run of a name writes
`<pipeline>/_owner.json` (created only if absent, with a conditional write) naming the spec by
its path: relative to the project for specs in the checkout, so every worker's clone agrees;
absolute otherwise. A run of another file with that name is refused before it reads or writes
anything else, unless told to take the name over (`imagegen run --take-over-name`, or the
flow's `take_over_name` parameter), which rewrites the record.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.storage import OWNER_KEY, PreconditionFailed, archive_bucket, put_conditionally, read_json, write_json
from flows.paying.ledger import with_backoff
from flows.specs.spec import PIPELINES_DIR, PipelineSpec


class NameTaken(RuntimeError):
    """Another spec file already archives under this pipeline name."""


def spec_identity(path: Path) -> str:
    """The spec's path, relative to the project when it is inside the checkout."""
    resolved, project = path.resolve(), PIPELINES_DIR.parent.resolve()
    return str(resolved.relative_to(project)) if resolved.is_relative_to(project) else str(resolved)


def name_taken(spec: PipelineSpec, path: Path) -> str | None:
    """Why `spec.name` is not this spec file's to archive under (read only; `own_name` decides
    at the run), or None: lets `imagegen run` refuse in one line before starting the flow."""
    found = read_json(archive_bucket(spec.archive.bucket, spec.archive.credentials),
                      OWNER_KEY.format(pipeline=spec.name))
    mine = spec_identity(path)
    if found is None:
        return None
    if found.get("spec") == mine:
        return ledger_moved(spec, found)
    return (f"pipeline name {spec.name!r} in s3://{spec.archive.bucket}/{spec.name}/ belongs to spec "
            f"{found.get('spec')} (since {found.get('since', '?')}); this spec is {mine}. Give this spec its own "
            "`name:`, or, if it replaces that one, run once with --take-over-name")


def ledger_moved(spec: PipelineSpec, found: dict[str, Any]) -> str | None:
    """Why the spec's `archive.manifest_template` may not change, or None: its ledgers lie beside
    its manifests, so dates already run would be run again from nothing (a job left maybe
    charged sent again, every item paid again once the images' keys move too)."""
    was = found.get("manifest_template")
    if was is None or was == spec.archive.manifest_template:
        return None
    return (f"archive.manifest_template of {spec.name!r} was {was!r} (recorded {found.get('since', '?')}): the job "
            f"ledgers of the dates already run are beside those manifests, so with {spec.archive.manifest_template!r} "
            "their runs would start from nothing and pay again. Put it back; or give the spec a new `name:`; or, to "
            "pay for those dates again, run once with --take-over-name")


def own_name(spec: PipelineSpec, path: Path, spec_sha256: str, *, take_over: bool = False) -> None:
    """Record `path` as the owner of `spec.name` in the archive, or raise `NameTaken`."""
    bucket = archive_bucket(spec.archive.bucket, spec.archive.credentials)
    key = OWNER_KEY.format(pipeline=spec.name)
    mine = spec_identity(path)
    found: dict[str, Any] | None = with_backoff(lambda: read_json(bucket, key), "owner record read")
    if found is not None and found.get("spec") == mine:
        if not take_over and (moved := ledger_moved(spec, found)) is not None:
            raise NameTaken(moved + " (flow parameter take_over_name)")
        if found.get("manifest_template") != spec.archive.manifest_template:  # recorded from now on
            with_backoff(lambda: write_json(bucket, key, {**found, "manifest_template": spec.archive.manifest_template}),
                         "owner record write")
        return
    if found is not None and not take_over:
        raise NameTaken(
            f"pipeline name {spec.name!r} in s3://{spec.archive.bucket}/{spec.name}/ belongs to spec {found.get('spec')} "
            f"(since {found.get('since', '?')}); this spec is {mine}. Give this spec its own `name:`, or, if it "
            "replaces that one, run once with --take-over-name (flow parameter take_over_name)")
    record = {"spec": mine, "spec_sha256": spec_sha256, "since": datetime.now(timezone.utc).isoformat(),
              "previous": found.get("spec") if found else None, "manifest_template": spec.archive.manifest_template}
    body = json.dumps(record, indent=2, sort_keys=True).encode()

    def write() -> bool:
        if found is not None:  # taking the name over: the record is replaced
            write_json(bucket, key, record)
            return True
        try:
            put_conditionally(bucket, key, body, if_match=None)
        except PreconditionFailed:
            return False  # another run created it first: its answer decides
        return True

    if not with_backoff(write, "owner record write"):
        own_name(spec, path, spec_sha256, take_over=False)
