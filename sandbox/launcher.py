"""Start and stop the sandbox: the provider emulators and SeaweedFS, as background processes.

`up()` makes a fresh sandbox account for every registered emulator (`sandbox/accounts.py`),
starts each and SeaweedFS with a fresh S3 identity, waits until all answer, creates the buckets
and writes `state.json` in the state directory. `register_blocks()` saves Prefect Blocks pointing at them.
`down()` stops what `up()` started. The keys here are sandbox keys, never real ones.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from deployments.processes import alive, spawn, stop_all, wait_until
from sandbox.accounts import emulator, emulators, read_secret, secret_file
from sandbox.s3 import weed_binary, weed_command, write_identity

DEFAULT_STATE_DIR = Path(".sandbox")
DEFAULT_BUCKETS = ("imagegen-demo",)
BLOCK_NAME = "sandbox"


@dataclass
class SandboxState:
    """Where the running sandbox listens and how to reach it: per provider (every registered
    emulator) its URL and sandbox account, and the S3 server."""

    state_dir: str
    providers: dict[str, dict[str, str]]  # name -> {"url": ..., **account}
    s3_url: str
    s3_access_key: str
    s3_secret_key: str
    buckets: list[str]
    pids: dict[str, int] = field(default_factory=dict)

    def save(self) -> None:
        path = Path(self.state_dir) / "state.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, state_dir: Path = DEFAULT_STATE_DIR) -> SandboxState | None:
        path = Path(state_dir) / "state.json"
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**data) if "providers" in data else None  # a state file of an older layout: none
        except (ValueError, TypeError, OSError) as exc:
            raise SandboxError(f"{path} is not a sandbox state file ({exc}); stop what it started, if anything, "
                               f"and remove it (or `imagegen sandbox up --state-dir` another folder)") from None

    def url(self, provider: str) -> str:
        return self.providers[provider]["url"]

    def account(self, provider: str) -> dict[str, str]:
        return {k: v for k, v in self.providers[provider].items() if k != "url"}

    def secret(self, provider: str, field_name: str) -> str:
        """A sandbox secret of a provider's account (read from its file)."""
        return read_secret(self.providers[provider], field_name)

    def block(self, provider: str) -> Any:
        """The provider's Block for its sandbox account and emulator (not saved)."""
        from blocks import registry

        fields = emulator(provider).block_fields(self.account(provider))
        return registry.provider(provider)(**fields, endpoint=self.url(provider))


class SandboxError(RuntimeError):
    """The sandbox could not start: a port is taken, or a process died while starting."""


class PortTaken(SandboxError):
    """A port the sandbox needs is in use."""


def running(state_dir: Path = DEFAULT_STATE_DIR) -> SandboxState | None:
    """The sandbox of `state_dir` when every one of its processes is alive."""
    state = SandboxState.load(Path(state_dir).resolve())
    return state if state and state.pids and all(alive(pid) for pid in state.pids.values()) else None


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str:
    """Who listens on `port`: `pid N (command line)` from /proc, else `another process`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    sockets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir() if sockets else ():
        if proc.name.isdigit() and _holds(proc, sockets):
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                command = "exited since"
            return f"pid {proc.name} ({command[:160]})"
    return "another process"


def _holds(proc: Path, sockets: set[str]) -> bool:
    """Whether the process `proc` (its /proc directory) has one of `sockets` open. A file it
    closes while it is looked at is passed over, not the process: a busy process (a Prefect
    server, a test worker) opens and closes files all the time."""
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in sockets:
                return True
        except OSError:
            continue
    return False


def free_port() -> int:
    """A loopback port free now."""
    return free_ports(1)[0]


def free_ports(count: int, taken: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct loopback ports free now, none in `taken`: each is held until all are chosen,
    so the kernel cannot hand one out twice."""
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] in taken:
                sock.close()  # bound to no port again: the next bind gets another
                continue
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def up_on_free_ports(state_dir: Path = DEFAULT_STATE_DIR, *, fixed: dict[str, int] | None = None,
                     providers: list[str] | None = None, attempts: int = 3, **options: Any) -> SandboxState:
    """`up()` with every emulator (but those in `fixed`) and S3 on ports free now; chosen again
    when another process binds one of them before its server does."""
    names = [name for name in providers or emulators() if name not in (fixed or {})]
    for attempt in range(attempts):
        *chosen, s3_port = free_ports(len(names) + 1, frozenset((fixed or {}).values()))
        try:
            return up(state_dir, ports={**dict(zip(names, chosen)), **(fixed or {})}, s3_port=s3_port,
                      providers=providers, **options)
        except PortTaken as exc:
            if attempt == attempts - 1 or any(f"port {port} " in str(exc) for port in (fixed or {}).values()):
                raise
    raise AssertionError("unreachable")


def up(state_dir: Path = DEFAULT_STATE_DIR, *, ports: dict[str, int] | None = None, s3_port: int = 8333,
       latency: float = 2.0, buckets: tuple[str, ...] = DEFAULT_BUCKETS,
       providers: list[str] | None = None) -> SandboxState:
    """Start every registered emulator (or those named in `providers`; each on `ports[name]`,
    else its `DEFAULT_PORT`) and SeaweedFS; return their state (also written to `state.json`)."""
    try:
        weed_binary()  # before anything starts: the S3 server is an install extra
    except RuntimeError as exc:
        raise SandboxError(str(exc)) from None
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = SandboxState.load(state_dir)
    if existing and any(alive(pid) for pid in existing.pids.values()):
        down(state_dir)  # a sandbox partly dead: what is left of it goes; the caller reuses a whole one

    chosen = {name: (ports or {}).get(name, emulator(name).DEFAULT_PORT) for name in providers or emulators()}
    for name, port in {**chosen, "s3": s3_port}.items():
        if not _port_free(port):
            flag = "--s3-port PORT" if name == "s3" else f"--port {name}=PORT"
            raise PortTaken(f"port {port} for the {name} sandbox is taken by {port_holder(port)}; stop it, or "
                            f"choose another port with {flag} (or --free-ports)")
    accounts: dict[str, dict[str, str]] = {}
    pids: dict[str, int] = {}
    for name, port in chosen.items():
        module = emulator(name)
        account, account_file = _account(state_dir, name, module)
        pids[name] = spawn([sys.executable, "-m", "sandbox.serve", name, "--port", str(port),
                            "--latency", str(latency), "--account", str(account_file),
                            "--keep", str(_kept_file(state_dir, name))],
                           state_dir / f"{name}.log").pid
        accounts[name] = {"url": f"http://127.0.0.1:{port}", **account}
    access_key, secret_key = "sandbox" + secrets.token_hex(6), secrets.token_urlsafe(24)
    write_identity(state_dir / "s3-identity.json", access_key, secret_key)
    state = SandboxState(state_dir=str(state_dir), providers=accounts, s3_url=f"http://127.0.0.1:{s3_port}",
                         s3_access_key=access_key, s3_secret_key=secret_key, buckets=list(buckets), pids=pids)
    state.save()
    try:
        for name, port in chosen.items():
            _wait(_answered_by(f"{state.url(name)}/_sandbox/health", pids[name]), state, name, port,
                  what=f"the {name} emulator")
        _start_s3(state, s3_port, taken=frozenset(chosen.values()))
        _create_buckets(state)
    except Exception:
        down(state_dir)
        raise
    return state


def _answered_by(url: str, pid: int) -> Callable[[], bool]:
    """A check: the emulator process `pid` itself answers `url` (its health). Another server that
    bound the port between our choosing it and the emulator's start also answers 200 there (the
    Prefect server's UI does for any path), and the emulator then exits: `_wait` sees it and
    raises `PortTaken`, so the port is chosen again."""
    def check() -> bool:
        try:
            answer = httpx.get(url, timeout=2)
            return answer.status_code == 200 and answer.json().get("pid") == pid
        except (httpx.TransportError, ValueError, AttributeError):
            return False
    return check


def _kept_file(state_dir: Path, name: str) -> Path:
    """Where emulator `name` keeps its account's jobs across restarts (`sandbox.serve --keep`)."""
    return state_dir / f"{name}_kept.pickle"


def _account(state_dir: Path, name: str, module: Any) -> tuple[dict[str, str], Path]:
    """The emulated account of `name` and its file: the one an earlier `up` made while its
    files are all there (a real account outlives our restarts, and so do its jobs), else a new one."""
    path = state_dir / f"{name}_account.json"
    try:
        account = json.loads(path.read_text())
        if isinstance(account, dict) and all(Path(value).is_file() for key, value in account.items()
                                             if key.endswith("_file")):
            return account, path
    except (OSError, ValueError):
        pass
    account = module.sandbox_account(state_dir)
    _kept_file(state_dir, name).unlink(missing_ok=True)  # a new account has no jobs yet
    return account, Path(secret_file(state_dir, f"{name}_account.json", json.dumps(account)))


S3_INTERNAL_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                     "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")
PORT_TAKEN = {"s3": "(specified by flag s3.port)"}  # else uvicorn's words, below


def _wait(ready: Callable[[], bool], state: SandboxState, name: str, port: int, *, what: str) -> None:
    """Wait until `ready()`; PortTaken when the process `name` exited because `port` was taken."""
    try:
        wait_until(ready, state.pids[name], Path(state.state_dir) / f"{name}.log", what=what, timeout=60,
                   error=SandboxError)
    except SandboxError as exc:
        if "exited while starting" in str(exc) and PORT_TAKEN.get(name, "address already in use") in str(exc):
            raise PortTaken(f"port {port} for the {name} sandbox was taken while it started, by "
                            f"{port_holder(port)}: {exc}") from None
        raise


def _start_s3(state: SandboxState, s3_port: int, taken: frozenset[int], attempts: int = 3) -> None:
    """Start SeaweedFS on `s3_port`, its own ports chosen here (again, when another process binds
    one first), and wait until SeaweedFS itself answers there."""
    state_dir = Path(state.state_dir)
    (state_dir / "s3-data").mkdir(exist_ok=True)
    for attempt in range(attempts):
        internal = dict(zip(S3_INTERNAL_PORTS, free_ports(len(S3_INTERNAL_PORTS), taken | {s3_port})))
        command = weed_command(state_dir / "s3-data", state_dir / "s3-identity.json", {**internal, "s3.port": s3_port})
        state.pids["s3"] = spawn(command, state_dir / "s3.log").pid
        state.save()
        try:
            _wait(_seaweed_answers(state.s3_url), state, "s3", s3_port, what="the S3 server")
            return
        except PortTaken:
            raise
        except SandboxError as exc:
            if attempt == attempts - 1 or "Port allocation failed" not in str(exc):
                raise  # else one of its own ports was taken meanwhile: again, on others


def _seaweed_answers(url: str) -> Callable[[], bool]:
    """A check: SeaweedFS answers at `url` (not some other server that took the port)."""
    def check() -> bool:
        try:
            return "seaweedfs" in httpx.get(url, timeout=2).headers.get("server", "").lower()
        except httpx.TransportError:
            return False
    return check


def _create_buckets(state: SandboxState, timeout: float = 60.0) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=state.s3_url, aws_access_key_id=state.s3_access_key,
                          aws_secret_access_key=state.s3_secret_key, region_name="us-east-1",
                          config=Config(signature_version="s3v4", retries={"max_attempts": 1}))
    log = Path(state.state_dir) / "s3.log"
    deadline = time.monotonic() + timeout
    for bucket in state.buckets:
        while True:  # the filer may answer before it accepts writes
            try:
                client.create_bucket(Bucket=bucket)
                break
            except client.exceptions.BucketAlreadyOwnedByYou:
                break
            except Exception as exc:
                if not alive(state.pids["s3"]) or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise SandboxError(f"the S3 server did not create bucket {bucket} ({exc}); log {log}:\n"
                                       f"{tail}") from None
                time.sleep(0.2)


def down(state_dir: Path = DEFAULT_STATE_DIR) -> bool:
    """Stop the sandbox's processes; False when none was running."""
    state = SandboxState.load(Path(state_dir).resolve())
    if state is None:
        return False
    stop_all(list(state.pids.values()), grace=5)
    state.pids = {}
    state.save()
    return True


def register_blocks(state: SandboxState, name: str = BLOCK_NAME) -> list[str]:
    """Save a provider Block per emulator and an AwsCredentials Block, all named `name`."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    saved = []
    for provider in state.providers:
        block = state.block(provider)
        block.save(name, overwrite=True)
        saved.append(f"{block.get_block_type_slug()}/{name}")
    AwsCredentials(aws_access_key_id=state.s3_access_key, aws_secret_access_key=state.s3_secret_key,
                   region_name="us-east-1",
                   aws_client_parameters=AwsClientParameters(endpoint_url=state.s3_url)).save(name, overwrite=True)
    return [*saved, f"aws-credentials/{name}"]