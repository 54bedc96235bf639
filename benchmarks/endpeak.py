"""The end of a long run alone, for real: what its memory peak is made of, in minutes, not the
half hour a 5,000-item run takes.

    python -m benchmarks.endpeak 5000

It starts the sandbox (its S3 server) and a temporary Prefect server, writes the objects a run
of that many items leaves (an image and a sidecar each, in one folder), then runs a flow that
holds that many archived outcomes as a run holds them (`Outcomes`) and does what the end of
`run-pipeline` does with them, in the same functions: confirm each against the bucket's
listing and make the manifest, write it and the hashes, send the gallery's pages and the
summary table. It prints the resident memory and its peak after each step. Run it as the flow
runs (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`, as `imagegen run` sets it) for numbers
like the flow's; with `PYTHONTRACEMALLOC=1` it also prints Python's own allocations, held and
at most within each step (slower; the resident numbers then include tracemalloc's own).
"""

from __future__ import annotations

import hashlib
import resource
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

BUCKET = "imagegen-endpeak"
RUN_DATE = date(2026, 1, 1)


def memory() -> tuple[float, float]:
    """The process's resident memory now and at its peak, in MB."""
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * resource.getpagesize()
    return resident / 1e6, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Steps:
    """Prints each step's memory; keeps the peak the run had before the first."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_peak: float | None = None

    def mark(self, step: str) -> None:
        now, peak = memory()
        self.first_peak = peak if self.first_peak is None else self.first_peak
        traced = ""
        if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=1: Python's own allocations, peak within the step
            held, top = tracemalloc.get_traced_memory()
            traced = f"  traced {held / 1e6:6.1f} MB, {top / 1e6:6.1f} at most in the step"
            tracemalloc.reset_peak()
        print(f"{step:36s} resident {now:7.1f} MB  peak {peak:7.1f} MB (+{peak - self.first_peak:5.1f})  "
              f"{time.monotonic() - self.started:6.1f} s{traced}", flush=True)


def written(n: int) -> tuple[str, bytes, str]:
    """Item `n`'s image: its key, bytes and ETag (the MD5 of a single-part upload)."""
    body = b"x" * (2000 + n)
    return f"endpeak/{RUN_DATE}/item-{n:05d}-1.png", body, f'"{hashlib.md5(body).hexdigest()}"'


def write_objects(state: Any, items: int) -> None:
    """An image and a sidecar per item, in the run's folder."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=state.s3_url, aws_access_key_id=state.s3_access_key,
                          aws_secret_access_key=state.s3_secret_key, region_name="us-east-1",
                          config=Config(signature_version="s3v4", max_pool_connections=16))

    def put(n: int) -> None:
        key, body, etag = written(n)
        if client.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"] != etag:
            raise RuntimeError(f"{key}: the S3 server's ETag is not the MD5 of the bytes")
        client.put_object(Bucket=BUCKET, Key=key.removesuffix(".png") + ".json", Body=b"{}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(items)))


def spec_text(items: int) -> str:
    return (f"version: 1\nname: endpeak\nprovider: tams\nblocks: {{tams: sandbox}}\n"
            f"archive: {{bucket: {BUCKET}, credentials: sandbox}}\nitems:\n"
            + "".join(f"  - {{id: item-{n:05d}, prompt: p{n}}}\n" for n in range(items)))


def outcomes_of(plans: list[Any]) -> Any:
    """Each plan's archived outcome, kept as a run keeps those of ended items."""
    from flows.models import ArchivedItem
    from flows.running.settle import Outcomes

    kept = Outcomes()
    for n, plan in enumerate(plans):
        key, body, etag = written(n)
        digest = hashlib.sha256(body).hexdigest()
        kept.keep(plan.item_id, (ArchivedItem(
            item_id=plan.item_id, provider="tams", job_id=digest[:32], credits=1.5, credits_source="charged",
            images=1, objects=[{"index": 1, "s3_uri": f"s3://{BUCKET}/{key}",
                                "sidecar": f"s3://{BUCKET}/{key.removesuffix('.png')}.json", "sha256": digest,
                                "bytes": len(body), "etag": etag, "phash": digest[:16], "verdict": "approved",
                                "reasons": []}]), None))
    return kept


def the_end(spec_file: str, work: str) -> None:
    """The end of `run-pipeline` (`_run` after its items ended, then `publish`), step by step: the
    run's own functions, `publish` saying as each of its steps ends."""
    import gc

    from prefect.artifacts import create_markdown_artifact

    from flows import pipeline
    from flows.running import report
    from flows.specs.spec import load_spec
    from flows.storage import archive_bucket, presigned_url, read_object

    spec = load_spec(Path(spec_file))
    plans = pipeline.plan_items(spec, "0" * 64, RUN_DATE, work)
    bucket = archive_bucket(spec.archive.bucket, spec.archive.credentials)
    first = written(0)[0]
    read_object(bucket, first), presigned_url(bucket, first)  # the clients a run has made by its end
    create_markdown_artifact("warming up", key="endpeak-warm-up")
    settled = outcomes_of(plans)
    gc.collect()
    steps = Steps()
    steps.mark("outcomes held, as at the end")
    charges = pipeline._Charges()
    outcomes = pipeline._outcomes(plans, {}, {}, (settled, {}))
    del settled
    manifest = report.build_manifest(spec, spec_file, "0" * 64, RUN_DATE, plans,
                                     pipeline._confirmed(spec, outcomes, charges), datetime.now(timezone.utc),
                                     charges=charges)
    del outcomes
    steps.mark("listed, confirmed, manifest made")
    if manifest["status"] != "complete":  # every object is there as written: each item must confirm
        raise RuntimeError(f"{manifest['totals']['failed_items']} item(s) not confirmed")
    report.publish(spec, RUN_DATE, manifest, done=steps.mark)  # marks each of its steps


def main(argv: list[str]) -> None:
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from sandbox import launcher

    items = int(argv[0]) if argv else 5000
    work = Path(tempfile.mkdtemp(prefix="endpeak-"))
    state = launcher.up_on_free_ports(work / "sandbox", latency=0.1, buckets=(BUCKET,))
    try:
        with prefect_test_harness(server_startup_timeout=120):
            launcher.register_blocks(state)
            write_objects(state, items)
            spec_path = work / "endpeak.yaml"
            spec_path.write_text(spec_text(items))
            flow(name="endpeak")(the_end)(str(spec_path), str(work))
    finally:
        launcher.down(work / "sandbox")


if __name__ == "__main__":
    main(sys.argv[1:])
