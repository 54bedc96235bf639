"""The job ledger: each item's provider job, persisted in S3 beside the outputs.

One small JSON object per item at `<manifest dir>/_jobs/<item>.json`, written before a
submit ("submitting"), right after it with the provider's job id ("submitted", before the
first poll), and when the item is archived ("archived", with what landed where). A retried
task or a rerun reads it first: an archived item is reused without any provider call, a
submitted job is resumed by id instead of submitted again, and a submit that may or may not
have reached the provider is reconciled, never blindly repeated.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from blocks.archive import archive_bucket, read_json, write_json
from flows.spec import ArchiveSettings, render_manifest_key


class JobLedger:
    """Ledger records of one pipeline run date."""

    def __init__(self, archive: ArchiveSettings, pipeline: str, run_date: date) -> None:
        self.bucket = archive_bucket(archive.bucket, archive.credentials)
        manifest = render_manifest_key(archive.manifest_template, pipeline=pipeline, run_date=run_date)
        self.prefix = (manifest.rsplit("/", 1)[0] + "/" if "/" in manifest else "") + "_jobs/"

    def key(self, item_id: str) -> str:
        return f"{self.prefix}{item_id}.json"

    def get(self, item_id: str) -> dict[str, Any] | None:
        return read_json(self.bucket, self.key(item_id))

    def recorded(self) -> set[str]:
        """The items that have a record, from one listing instead of a read per item."""
        client = self.bucket.credentials.get_s3_client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket.bucket_name, Prefix=self.prefix)
        return {obj["Key"][len(self.prefix):].removesuffix(".json") for page in pages for obj in page.get("Contents", [])}

    def put(self, item_id: str, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "updated_at": datetime.now(timezone.utc).isoformat()}
        write_json(self.bucket, self.key(item_id), record)
        return record
