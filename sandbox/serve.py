"""Run one emulator: ``python -m sandbox.serve PROVIDER --port P --account FILE``.

FILE is the account the launcher made with the emulator's `sandbox_account` hook (JSON); the
emulator module comes from the `imagegen.emulators` entry points (`sandbox/accounts.py`), so
this process imports no client code."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import uvicorn

from sandbox.accounts import emulator, emulators
from sandbox.base import Emulator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.serve", description=__doc__)
    parser.add_argument("provider", choices=list(emulators()))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds a job takes")
    parser.add_argument("--account", type=Path, required=True, help="the account's JSON file")
    parser.add_argument("--keep", type=Path, default=None,
                        help="the file that keeps the account's jobs across restarts (read at start, written at exit)")
    args = parser.parse_args(argv)
    app = emulator(args.provider).make_app(json.loads(args.account.read_text()), args.latency)
    kept = getattr(app.state, "emulator", None) if args.keep else None
    if kept is not None:
        kept.restore(args.keep)
        app.router.lifespan_context = _keeping(kept, args.keep)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def _keeping(kept: Emulator, path: Path) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A lifespan whose shutdown (SIGTERM, SIGINT) writes what the provider would still know."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        kept.keep(path)
    return lifespan


if __name__ == "__main__":
    main()
