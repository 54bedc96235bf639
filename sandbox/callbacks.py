"""Callbacks as a provider delivers them: a JSON POST when a job ends, retried on any answer
but 200 at growing delays, to public URLs only (loopback and LAN targets are refused, as 触站AI
documents, unless the emulator runs in sandbox mode, where the receiver is on loopback too).

Faults, queued with the emulator's `POST /_sandbox/faults` and taken one per delivery:

- ``callback_lost``: never sent;
- ``callback_late``: sent ``delay`` seconds late;
- ``callback_duplicate``: sent twice;
- ``callback_forged``: before the real one, a forger posts a success to the URL with its
  signature altered, and replays this job's body onto the job delivered before it.
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

KINDS = ("callback_lost", "callback_late", "callback_duplicate", "callback_forged")


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
        """Deliver `body()` (built when sent) to `url` once the job has ended, `after` s from now."""
        task = asyncio.get_running_loop().create_task(self._deliver(url, body, after))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, body: Callable[[], dict[str, Any]], after: float) -> None:
        await asyncio.sleep(after)
        fault = self._take_fault()
        kind = fault["kind"] if fault else None
        if kind == "callback_lost":
            return
        if kind == "callback_late":
            await asyncio.sleep(float(fault.get("delay", 10)))  # type: ignore[union-attr]
        payload = body()
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
