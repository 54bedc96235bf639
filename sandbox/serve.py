"""Run one emulator: ``python -m sandbox.serve tams --port 8700 --public-key F --app-id A`` or
``python -m sandbox.serve chuzhan --port 8702 --token-file F``."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sandbox.serve")
    parser.add_argument("provider", choices=["tams", "chuzhan", "tencent"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=2.0, help="seconds a job takes")
    parser.add_argument("--app-id", help="TAMS: the app id")
    parser.add_argument("--public-key", type=Path, help="TAMS: the app's RSA public key (PEM)")
    parser.add_argument("--token-file", type=Path, help="file holding the token (触站AI; TAMS simple authentication) or SecretKey (Tencent)")
    parser.add_argument("--secret-id", help="Tencent: the SecretId to accept")
    parser.add_argument("--task-limit", type=int, default=2, help="触站AI: tasks in flight per account")
    args = parser.parse_args(argv)
    token = args.token_file.read_text().strip() if args.token_file else None

    if args.provider == "tams":
        from sandbox.tams import TamsEmulator

        if not args.app_id or not args.public_key:
            parser.error("tams needs --app-id and --public-key")
        app = TamsEmulator({args.app_id: args.public_key.read_bytes()}, latency=args.latency, token=token).app
    elif args.provider == "tencent":
        from sandbox.tencent import TencentEmulator

        if not token or not args.secret_id:
            parser.error("tencent needs --secret-id and --token-file (the SecretKey)")
        app = TencentEmulator({args.secret_id: token}, latency=args.latency).app
    else:
        from sandbox.chuzhan import ChuzhanEmulator

        if not token:
            parser.error("chuzhan needs --token-file")
        app = ChuzhanEmulator(token, latency=args.latency, task_limit=args.task_limit).app
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
