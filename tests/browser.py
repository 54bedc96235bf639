"""A headless Chromium driven over the DevTools protocol, to check what a person sees."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1400,1000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def page_text(url: str, wanted: list[str], port: int, timeout: float = 60.0,
              screenshot: Path | None = None) -> str:
    """Open `url`, wait until the page's text holds every string of `wanted`, return the text."""
    profile = tempfile.mkdtemp(prefix="imagegen-chromium-")
    proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                target = httpx.put(f"http://127.0.0.1:{port}/json/new?{url}", timeout=2).json()
                break
            except (httpx.TransportError, ValueError):
                assert time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.2)
        return asyncio.run(_wait_for_text(target["webSocketDebuggerUrl"], wanted, timeout, screenshot))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _wait_for_text(ws_url: str, wanted: list[str], timeout: float, screenshot: Path | None) -> str:
    import websockets

    async with websockets.connect(ws_url, max_size=50_000_000) as ws:
        ids = iter(range(1, 1_000_000))

        async def call(method: str, **params: object) -> dict:
            msg_id = next(ids)
            await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                answer = json.loads(await ws.recv())
                if answer.get("id") == msg_id:
                    return answer.get("result", {})

        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            result = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                returnByValue=True)
            text = result.get("result", {}).get("value") or ""
            if all(w in text for w in wanted):
                break
            await asyncio.sleep(0.5)
        if screenshot is not None:
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return text
