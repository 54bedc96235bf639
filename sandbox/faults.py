"""The emulators' fault hook: `POST /_sandbox/faults` queues a fault for the next matching API
requests (`count` of them, 1 unless given); `DELETE` clears the queue. Each emulator decides
which faults it knows and how a request matches one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class DroppedResponse(Response):
    """Starts a 200 answer and cuts the connection mid-body, as a dropped connection looks."""

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"', "more_body": True})
        raise ConnectionAbortedError("connection dropped (injected fault)")


async def fault_hook(request: Request, lock: threading.Lock, faults: list[dict[str, Any]],
                     refuse: Callable[[dict[str, Any]], str | None]) -> Response:
    """Queue or clear faults; `refuse(fault)` names why a fault is not one this emulator knows."""
    if request.method == "DELETE":
        with lock:
            faults.clear()
        return JSONResponse({"faults": []})
    fault = await request.json()
    error = refuse(fault)
    if error is not None:
        return JSONResponse({"error": error}, status_code=400)
    with lock:
        faults.append({"count": 1, **fault})
        return JSONResponse({"faults": faults})
