"""The emulators witness the providers' rate limits by counting requests as they arrive. An
image made on an emulator's event loop would hold up every other request meanwhile (45 ms for
512x512 on a quiet machine, several times that on a busy one), and the held requests would
then be counted together: a burst the client never sent. So images are made off the loop;
here one must be made while another request to the same emulator waits for its answer. And a
refusal is kept with the requests that filled its second, to tell what crowded it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from blocks import registry
from sandbox.accounts import emulator

HELD_FOR = 10.0  # seconds a render waits for the other request's answer


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` on a loopback port of its own (bound here, so no other process can take it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.01)
            assert thread.is_alive(), "the emulator did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.mark.parametrize("provider", ["tams", "chuzhan", "tencent"])
def test_an_image_being_made_does_not_hold_up_the_emulators_other_requests(
        provider: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = emulator(provider)
    account = module.sandbox_account(tmp_path)
    real_render, answered_meanwhile = module.render_png, []
    with serving(module.make_app(account, 0.05)) as url:
        def render(*args: Any, **kwargs: Any) -> bytes:
            answered = threading.Event()
            threading.Thread(target=lambda: (httpx.get(f"{url}/_sandbox/stats", timeout=30), answered.set()),
                             daemon=True).start()
            answered_meanwhile.append(answered.wait(HELD_FOR))
            return real_render(*args, **kwargs)

        monkeypatch.setattr(module, "render_png", render)
        block = registry.provider(provider)(**module.block_fields(account), endpoint=url)
        result = block.run_job(type(block).sample_request(), poll_interval=0.05, timeout=60)
    assert result.images and answered_meanwhile == [True] * len(answered_meanwhile) != [], answered_meanwhile


def test_a_refusal_is_kept_with_the_requests_that_filled_its_second() -> None:
    from sandbox.limits import SlidingWindow

    window = SlidingWindow(2)
    assert window.allow("app", "GET /a") and window.allow("app", "POST /b") and window.allow("other", "GET /c")
    assert not window.allow("app", "GET /d")
    [refusal] = window.refusals
    assert refusal["refused"] == "GET /d" and [seen for _, seen in refusal["ms_before"]] == ["GET /a", "POST /b"]
    assert all(0 <= ms < 1000 for ms, _ in refusal["ms_before"]) and window.rejected == 1
