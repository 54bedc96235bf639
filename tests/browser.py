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


# How long a page may take to show what a test waits for: its SQLite Prefect server shares a busy
# machine, and such a server stopped answering for a minute at a time until
# deployments/sqlite_cursors.py (docs/paying-once.md). A person would wait; so do the tests.
PATIENCE = 200.0


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def page_text(url: str, wanted: list[str], port: int, timeout: float = PATIENCE,
              screenshot: Path | None = None) -> str:
    """Open `url`, wait until the page's text holds every string of `wanted`, return the text."""
    condition = " && ".join(f"document.body.innerText.includes({json.dumps(w)})" for w in wanted) or "true"
    return str(page_until(url, f"document.body && ({condition}) ? document.body.innerText : ''", port, timeout,
                          screenshot) or "")


def page_until(url: str, until: str, port: int, timeout: float = PATIENCE, screenshot: Path | None = None,
               act: str | None = None) -> object:
    """Open `url` and evaluate the JavaScript `until` every half second until it is truthy (or
    `timeout` passes), running `act` before each try (a click that opens a form, say); return
    its last value."""
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
        return asyncio.run(_evaluate_until(target["webSocketDebuggerUrl"], until, act, timeout, screenshot))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _evaluate_until(ws_url: str, until: str, act: str | None, timeout: float,
                          screenshot: Path | None) -> object:
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

        async def evaluate(expression: str) -> object:
            result = await call("Runtime.evaluate", expression=f"(() => {{ try {{ return {expression}; }} "
                                f"catch (e) {{ return null; }} }})()", returnByValue=True)
            return result.get("result", {}).get("value")

        deadline = time.monotonic() + timeout
        value: object = None
        while time.monotonic() < deadline:
            if act is not None:
                await evaluate(act)
            value = await evaluate(until)
            if value:
                break
            await asyncio.sleep(0.5)
        if screenshot is not None:
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return value


def image_boxes(scope: str = "document", min_count: int = 1, src_has: str = "X-Amz-Signature") -> str:
    """JavaScript: once at least `min_count` images under `scope` (a JavaScript expression; null
    waits) whose src holds `src_has` have all loaded, each one's box in the page: alt, left, top,
    width, height, natural size, the width of its table cell, and `clipped` when an ancestor that
    clips (overflow not visible) cuts it left or right."""
    return (f"(() => {{ const root = {scope}; if (!root) return null;"
            f" const imgs = [...root.querySelectorAll('img')].filter(i => i.src.includes({json.dumps(src_has)}));"
            f" if (imgs.length < {min_count} || !imgs.every(i => i.complete && i.naturalWidth > 0)) return null;"
            " return imgs.map(i => { const r = i.getBoundingClientRect(); let clipped = false;"
            " for (let e = i.parentElement; e; e = e.parentElement) { if (getComputedStyle(e).overflowX === 'visible')"
            " continue; const b = e.getBoundingClientRect(); if (r.left < b.left - 0.5 || r.right > b.right + 0.5)"
            " clipped = true; }"
            " return {alt: i.alt, left: r.left, top: r.top, bottom: r.bottom, width: r.width, height: r.height,"
            " natural: [i.naturalWidth, i.naturalHeight], cell: (i.closest('td') || i.parentElement)"
            ".getBoundingClientRect().width, clipped}; }); })()")


RESUME_DIALOG = "document.querySelector('.p-modal')"  # the classic UI's Resume form

# JavaScript: each field of the open Resume form: its label, its description's text, its images
# (alt, bottom edge), and the top edge and value of its select; null while no form is open.
FORM_FIELDS = (f"(() => {{ const dialog = {RESUME_DIALOG}; if (!dialog) return null;"
               " const fields = [...dialog.querySelectorAll('.schema-form-property')];"
               " if (!fields.length) return null;"
               " return fields.map(f => ({label: f.querySelector('.schema-form-property__label')?.innerText.trim(),"
               " text: f.querySelector('.p-label__description')?.innerText ?? '',"
               " images: [...f.querySelectorAll('img')].map(i => ({alt: i.alt,"
               " bottom: i.getBoundingClientRect().bottom})),"
               " select: f.querySelector('select')?.getBoundingClientRect().top,"
               " value: f.querySelector('select')?.value})); })()")


def click_button(label: str) -> str:
    """JavaScript that clicks the first button reading `label`, if there is one."""
    return (f"([...document.querySelectorAll('button')].find(b => b.innerText.trim() === {json.dumps(label)})"
            "?.click(), true)")


def submit_resume_form(choices: dict[int, str]) -> str:
    """JavaScript run again and again: opens the Resume form, sets the select of field n (from 0)
    to `choices[n]` (again, if the form redraws it), then presses Submit once it is enabled, and
    again if the form is still open 15 s later (a click the form was not ready for is lost on a
    busy machine); `window.__submitted` says it pressed it."""
    sets = " ".join(f"selects[{n}].value = {json.dumps(v)}; selects[{n}].dispatchEvent(new Event('change', "
                    "{bubbles: true}));" for n, v in choices.items())
    chosen = " && ".join(f"selects[{n}].value === {json.dumps(v)}" for n, v in choices.items()) or "true"
    return (f"(() => {{ const dialog = {RESUME_DIALOG};"
            f" if (!dialog) {{ if (!window.__submitted) {click_button('Resume')}; return true; }}"
            " if (window.__clickedAt && Date.now() - window.__clickedAt < 15000) return true;"
            " const selects = [...dialog.querySelectorAll('.schema-form-property select')];"
            " if (!selects.length) return true;"
            f" if (!({chosen})) {{ {sets} return true; }}"
            " const submit = [...dialog.querySelectorAll('button')].find(b => b.innerText.trim() === 'Submit');"
            " if (!submit || submit.disabled) return true;"
            " submit.click(); window.__clickedAt = Date.now(); window.__submitted = true; return true; })()")
