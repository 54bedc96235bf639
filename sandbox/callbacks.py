"""Callbacks as a provider delivers them: a JSON POST when a job ends, retried on any answer
but 200 at growing delays, to public URLs only (loopback and LAN targets are refused, as 触站AI
documents, unless the emulator runs in sandbox mode, where the receiver is on loopback too).

Faults, queued with the emulator's `POST /_sandbox/faults` and taken one per delivery:

- ``callback_lost``: never sent;
- ``callback_late``: sent ``delay`` seconds late;
- ``callback_duplicate``: sent twice;
- ``callback_forged``: before the real one, a forger posts a success to the URL with its
  signature altered, and replays this job's body onto the job delivered before it;
- ``callback_reshaped``: the real body is sent in a shape the Blocks do not read (wrapped in
  ``{"event", "data"}``), as a provider whose undocumented body differs from what is assumed.

A forger holding this job's real URL (and so its nonce) posts, ``at`` seconds (0.1) after the
submit, long before the job ends, and the real callback follows as usual:

- ``callback_forged_task``: this job's body naming another job, ``task_id``;
- ``callback_forged_success``: this job's body saying it succeeded, its image at ``url``;
- ``callback_forged_fail``: this job's body saying it failed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import httpx

EARLY = ("callback_forged_task", "callback_forged_success", "callback_forged_fail")
KINDS = ("callback_lost", "callback_late", "callback_duplicate", "callback_forged", "callback_reshaped") + EARLY


def private_target(url: str) -> bool:
    """True for localhost, loopback and LAN targets (and anything without a host)."""
    host = urlparse(url).hostname or ""
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        return host in ("", "localhost")


class CallbackSender:
    """One emulator's deliveries: `attempts` tries, the n-th retry `step * n` seconds later."""

    def __init__(self, *, attempts: int = 5, step: float = 5.0, sandbox: bool = False) -> None:
        self.attempts, self.step, self.sandbox = attempts, step, sandbox
        self.counts: Counter[str] = Counter()
        self.faults: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_url: str | None = None

    def refuses(self, url: str) -> bool:
        """True where the provider would refuse this callback URL at submit."""
        return private_target(url) and not self.sandbox

    def _take_fault(self) -> dict[str, Any] | None:
        with self.lock:
            for fault in self.faults:
                if fault["count"] > 0:
                    fault["count"] -= 1
                    self.counts[fault["kind"]] += 1
                    return fault
        return None

    def schedule(self, url: str, body: Callable[[], dict[str, Any]], after: float) -> None:
        """Deliver `body()` (built when sent) to `url` once the job has ended, `after` s from now
        (the job's fault, if one is queued, is taken now, at its submit)."""
        task = asyncio.get_running_loop().create_task(self._deliver(url, body, after, self._take_fault()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, body: Callable[[], dict[str, Any]], after: float,
                       fault: dict[str, Any] | None) -> None:
        kind = fault["kind"] if fault else None
        if fault is not None and kind in EARLY:
            at = float(fault.get("at", 0.1))
            await asyncio.sleep(at)
            await self._forge_early(url, forged(body(), fault))
            after = max(0.0, after - at)
        await asyncio.sleep(after)
        if kind == "callback_lost":
            return
        if kind == "callback_late":
            await asyncio.sleep(float(fault.get("delay", 10)))  # type: ignore[union-attr]
        payload = body()
        if kind == "callback_reshaped":
            payload = {"event": "job.finished", "data": payload}
        async with httpx.AsyncClient(timeout=10) as client:
            if kind == "callback_forged":
                await self._forge(client, url, payload)
            delivered = await self._post(client, url, payload)
            if delivered and kind == "callback_duplicate":
                await self._post(client, url, payload)
        with self.lock:
            self._last_url = url

    async def _forge(self, client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> None:
        altered = url[:-1] + ("A" if url[-1] != "A" else "B")
        targets = [altered] + ([self._last_url] if self._last_url else [])
        for target in targets:
            try:
                answer = await client.post(target, json=payload)
                self.counts[f"forged_answered_{answer.status_code}"] += 1
            except httpx.HTTPError:
                self.counts["forged_unanswered"] += 1

    async def _forge_early(self, url: str, payload: dict[str, Any]) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            try:
                answer = await client.post(url, json=payload)
                self.counts[f"forged_answered_{answer.status_code}"] += 1
            except httpx.HTTPError:
                self.counts["forged_unanswered"] += 1

    async def _post(self, client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> bool:
        for attempt in range(self.attempts):
            self.counts["attempts"] += 1
            try:
                if (await client.post(url, json=payload)).status_code == 200:
                    self.counts["delivered"] += 1
                    return True
            except httpx.HTTPError:
                pass
            if attempt + 1 < self.attempts:
                await asyncio.sleep(self.step * (attempt + 1))
        self.counts["given_up"] += 1
        return False

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


def forged(payload: dict[str, Any], fault: dict[str, Any]) -> dict[str, Any]:
    """A job's callback body as a forger rewrites it for `fault` (TAMS's `{"job": ...}` shape or
    触站AI's flat one): naming another task, or saying it succeeded (image at `url`) or failed."""
    kind = fault["kind"]
    if isinstance(payload.get("job"), dict):  # TAMS
        job = dict(payload["job"])
        if kind == "callback_forged_task":
            job["id"] = str(fault["task_id"])
        elif kind == "callback_forged_success":
            job.update(status="SUCCESS", successInfo={"images": [{"id": "1", "url": fault["url"], "expiredIn": "0"}]})
        else:
            job.update(status="FAILED", failedInfo={"reason": "forged"})
        return {"job": job}
    body = dict(payload)  # 触站AI
    if kind == "callback_forged_task":
        body["taskId"] = str(fault["task_id"])
    elif kind == "callback_forged_success":
        body.update(state="success", progress=1, images=[{"imageUrl": fault["url"], "audit": 1}], imgUrl=fault["url"],
                    audit=1)
    else:
        body.update(state="fail", failReason="forged")
    return body
