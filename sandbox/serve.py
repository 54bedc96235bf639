"""Run one emulator: ``python -m sandbox.serve tams --port 8700 --public-key F --app-id A``."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sandbox.serve")
    parser.add_argument("provider", choices=["tams"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds a job takes")
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--public-key", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, help="file holding a Bearer token to accept")
    args = parser.parse_args(argv)

    from sandbox.tams import TamsEmulator

    token = args.token_file.read_text().strip() if args.token_file else None
    emulator = TamsEmulator({args.app_id: args.public_key.read_bytes()}, latency=args.latency, token=token)
    uvicorn.run(emulator.app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
