"""Run one emulator: ``python -m sandbox.serve PROVIDER --port P --account FILE``.

FILE is the account the launcher made with the emulator's `sandbox_account` hook (JSON); the
emulator module comes from the `imagegen.emulators` entry points (`sandbox/accounts.py`), so
this process imports no client code."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import uvicorn

from sandbox.accounts import emulator, emulators


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.serve", description=__doc__)
    parser.add_argument("provider", choices=list(emulators()))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds a job takes")
    parser.add_argument("--account", type=Path, required=True, help="the account's JSON file")
    args = parser.parse_args(argv)
    app = emulator(args.provider).make_app(json.loads(args.account.read_text()), args.latency)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
