"""The baseline: the same workload as a plain asyncio + httpx script, as a user might write it
instead of the flow. Limits are held in this process (a spaced token bucket per rate, a
semaphore per in-flight cap, from the same `deployments/limits.yaml` and safety factor), so
they hold for one process only. No ledger, no Prefect, no manifest: generate, review
(readable, not blank, size, moderation) and archive each image with its JSON sidecar.

It borrows the wire details from the provider Blocks (their client options with signing, their
request shapes and answer readers), so both ways send the same requests for any registered
provider; the sending, retrying and orchestration around them are its own.

    python -m benchmarks.baseline SPEC --sandbox-state DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config

from blocks.base import ApiCall, ImageProvider, JobState
from blocks.errors import TransientError
from flows.paying.slots import PrefectLimiter
from flows.imaging.images import measure
from flows.pipeline import plan_items
from flows.imaging.review import nsfw_score
from flows.specs.spec import load_spec
from flows.storage import render_key
from flows.models import ItemPlan
from sandbox.launcher import SandboxState


class Spaced:
    """At most `rate` acquisitions a second, evenly spaced (like a limit of 1 decaying at `rate`)."""

    def __init__(self, rate: float) -> None:
        self.interval, self.next_free, self.lock = 1.0 / rate, 0.0, asyncio.Lock()

    async def take(self) -> None:
        async with self.lock:
            now = time.monotonic()
            wait = self.next_free - now
            self.next_free = max(now, self.next_free) + self.interval
        if wait > 0:
            await asyncio.sleep(wait)


class Limits:
    """One provider account's limits, in process: which action counts against which limit is
    the flow's own rule (`PrefectLimiter`), only the waiting is local."""

    def __init__(self, provider: str) -> None:
        self.rule = PrefectLimiter(provider, "baseline")  # only read, never asks the Prefect server
        declared = self.rule.declared
        self.rates = {a: Spaced(self.rule.limits.applied_rate(r)) for a, r in declared.rate.items()}
        self.jobs = {a: asyncio.Semaphore(c) for a, c in declared.jobs.items()}

    async def request(self, action: str) -> None:
        key = self.rule.rate_action(action)
        if key is not None:
            await self.rates[key].take()

    @contextlib.asynccontextmanager
    async def job(self, action: str) -> AsyncIterator[None]:
        cap = self.rule.job_cap(action)
        sem = self.jobs[cap[0]] if cap else None
        if sem is None:
            yield
            return
        async with sem:
            yield


class Client:
    """Submit, poll and download for one provider: the Block's request shapes and answer
    readers, sent by a plain async httpx client with its own retries; returns the images and
    the polls it took."""

    def __init__(self, provider: str, state: SandboxState, timeout: float) -> None:
        self.provider, self.limits = provider, Limits(provider)
        self.block: ImageProvider = state.block(provider)
        self.http = httpx.AsyncClient(**{**self.block.client_options(), "timeout": timeout})
        self.downloads = httpx.AsyncClient(timeout=timeout)

    async def _send(self, call: ApiCall) -> Any:
        for attempt in range(6):
            await self.limits.request(call.action)
            response = await self.http.request(call.method, call.path, content=call.body, headers=dict(call.headers))
            try:
                return self.block.read_answer(call, response)
            except TransientError as exc:
                await asyncio.sleep(max(exc.retry_after or 0.0, min(8.0, 0.5 * 2**attempt)))
        raise RuntimeError(f"{self.provider} {call.what}: still refused after 6 attempts")

    async def run(self, plan: ItemPlan) -> tuple[list[bytes], int]:
        """Submit, poll every `poll_interval` (first after one interval), download."""
        polls = 0
        async with self.limits.job(self.block.job_action(plan.request)):
            job_id = self.block.read_job_id(await self._send(self.block.submit_call(plan.request)))
            while True:
                await asyncio.sleep(plan.poll_interval)
                status = self.block.read_status(job_id, await self._send(self.block.poll_call(job_id)))
                polls += 1
                if status.state.final:
                    break
            if status.state is not JobState.SUCCEEDED:
                raise RuntimeError(f"{self.provider} job {job_id} ended {status.provider_status}")
            images = [(await self.downloads.get(u)).content for u in status.result_urls]
        return images, polls


def review(plan: ItemPlan, data: bytes) -> dict[str, Any]:
    m = measure(data)
    reasons = []
    if m["error"] is not None:
        return {"approved": False, "reasons": [f"unreadable ({m['error']})"]}
    if float(m["stddev"] or 0) < plan.review.min_stddev:
        reasons.append("blank")
    if plan.final_size and (m["width"], m["height"]) != tuple(plan.final_size):
        reasons.append("size")
    score = nsfw_score(data) if plan.review.moderation is not None else None
    if score is not None and score >= plan.review.moderation.threshold:
        reasons.append("moderation")
    return {"approved": not reasons, "reasons": reasons, "nsfw": score, "stddev": m["stddev"]}


async def process(plan: ItemPlan, client: Client, s3: Any, window: asyncio.Semaphore) -> dict[str, Any]:
    async with window:
        images, polls = await client.run(plan)
        for index, data in enumerate(images, start=1):
            verdict = await asyncio.to_thread(review, plan, data)
            key = render_key(plan.archive.key_template, pipeline=plan.pipeline, run_date=plan.run_date,
                             item=plan.item_id, index=index, provider=plan.provider)
            await asyncio.to_thread(s3.put_object, Bucket=plan.archive.bucket, Key=key, Body=data)
            sidecar = {"item": plan.item_id, "provider": plan.provider, "prompt": plan.request.prompt,
                       "seed": plan.request.seed, "review": verdict}
            await asyncio.to_thread(s3.put_object, Bucket=plan.archive.bucket, Key=key.rsplit(".", 1)[0] + ".json",
                                    Body=json.dumps(sidecar).encode())
        return {"item": plan.item_id, "provider": plan.provider, "images": len(images), "polls": polls}


async def run(spec_path: Path, state: SandboxState, run_date: date) -> dict[str, Any]:
    spec = load_spec(spec_path)
    plans = plan_items(spec, "", run_date, "")
    clients = {p: Client(p, state, spec.run.http_timeout) for p in {plan.provider for plan in plans}}
    s3 = boto3.client("s3", endpoint_url=state.s3_url, aws_access_key_id=state.s3_access_key,
                      aws_secret_access_key=state.s3_secret_key, region_name="us-east-1",
                      config=Config(signature_version="s3v4", max_pool_connections=32))
    window = asyncio.Semaphore(spec.run.max_parallel)
    results = await asyncio.gather(*(process(p, clients[p.provider], s3, window) for p in plans),
                                   return_exceptions=True)
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    for client in clients.values():
        await client.http.aclose()
        await client.downloads.aclose()
    return {"items": len(plans), "failed": len(failed), "errors": failed[:5],
            "images": sum(r["images"] for r in results if isinstance(r, dict))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks.baseline")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--sandbox-state", type=Path, required=True)
    parser.add_argument("--run-date", type=date.fromisoformat, default=date(2026, 1, 1))
    args = parser.parse_args(argv)
    state = SandboxState.load(args.sandbox_state)
    if state is None:
        parser.error(f"no sandbox state in {args.sandbox_state}")
    return asyncio.run(run(args.spec, state, args.run_date))


if __name__ == "__main__":
    print(json.dumps(main()))
