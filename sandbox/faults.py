"""The emulators' fault hook: `POST /_sandbox/faults` queues a fault for the next matching API
requests (`count` of them, 1 unless given); `DELETE` clears the queue. Each emulator decides
which faults it knows and how a request matches one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


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
