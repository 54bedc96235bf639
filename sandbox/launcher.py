"""Start and stop the sandbox: the provider emulators and SeaweedFS, as background processes.

`up()` generates the TAMS app's RSA key pair, starts the emulator with the public key and
SeaweedFS with a fresh S3 identity, waits until both answer, creates the buckets and writes
`state.json` in the state directory. `register_blocks()` saves Prefect Blocks pointing at them.
`down()` stops what `up()` started. The keys here are sandbox keys, never real ones.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.s3 import weed_command, write_identity

DEFAULT_STATE_DIR = Path(".sandbox")
DEFAULT_BUCKETS = ("imagegen-demo",)
BLOCK_NAME = "sandbox"


@dataclass
class SandboxState:
    """Where the running sandbox listens and how to reach it."""

    state_dir: str
    tams_url: str
    tams_app_id: str
    tams_private_key_file: str
    chuzhan_url: str
    chuzhan_token_file: str
    tencent_url: str
    tencent_secret_id: str
    tencent_secret_key_file: str
    s3_url: str
    s3_access_key: str
    s3_secret_key: str
    buckets: list[str]
    pids: dict[str, int] = field(default_factory=dict)
    tams_token_file: str = ""

    def save(self) -> None:
        path = Path(self.state_dir) / "state.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, state_dir: Path = DEFAULT_STATE_DIR) -> SandboxState | None:
        path = Path(state_dir) / "state.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None

    def tams_private_key(self) -> str:
        return Path(self.tams_private_key_file).read_text()

    def tams_token(self) -> str:
        return Path(self.tams_token_file).read_text().strip()

    def chuzhan_token(self) -> str:
        return Path(self.chuzhan_token_file).read_text().strip()

    def tencent_secret_key(self) -> str:
        return Path(self.tencent_secret_key_file).read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(cmd: list[str], log: Path) -> int:
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    return process.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _wait_http(url: str, pid: int, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"sandbox process {pid} exited while starting; log {log}:\n{tail}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"sandbox service at {url} not ready after {timeout:.0f}s; log {log}")


def up(state_dir: Path = DEFAULT_STATE_DIR, *, tams_port: int = 8700, chuzhan_port: int = 8702,
       tencent_port: int = 8703, s3_port: int = 8333,
       latency: float = 2.0, buckets: tuple[str, ...] = DEFAULT_BUCKETS) -> SandboxState:
    """Start the emulators and SeaweedFS; return their state (also written to `state.json`)."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = SandboxState.load(state_dir)
    if existing and any(_alive(pid) for pid in existing.pids.values()):
        down(state_dir)

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_file, public_file = state_dir / "tams_private_key.pem", state_dir / "tams_public_key.pem"
    private_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    private_file.chmod(0o600)
    public_file.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    app_id = "sandbox-" + secrets.token_hex(4)
    tams_token_file = state_dir / "tams_token"  # simple authentication, beside the RSA key
    tams_token_file.write_text(secrets.token_hex(16))
    tams_token_file.chmod(0o600)
    token_file = state_dir / "chuzhan_token"
    token_file.write_text(secrets.token_hex(16))
    token_file.chmod(0o600)
    tencent_id, tencent_key_file = "AKIDsandbox" + secrets.token_hex(8), state_dir / "tencent_secret_key"
    tencent_key_file.write_text(secrets.token_urlsafe(24))
    tencent_key_file.chmod(0o600)
    access_key, secret_key = "sandbox" + secrets.token_hex(6), secrets.token_urlsafe(24)
    s3_config = state_dir / "s3-identity.json"
    write_identity(s3_config, access_key, secret_key)
    (state_dir / "s3-data").mkdir(exist_ok=True)

    tams_log, chuzhan_log, s3_log = state_dir / "tams.log", state_dir / "chuzhan.log", state_dir / "s3.log"
    tencent_log = state_dir / "tencent.log"
    tams_pid = _spawn([sys.executable, "-m", "sandbox.serve", "tams", "--port", str(tams_port),
                       "--latency", str(latency), "--app-id", app_id, "--public-key", str(public_file),
                       "--token-file", str(tams_token_file)], tams_log)
    chuzhan_pid = _spawn([sys.executable, "-m", "sandbox.serve", "chuzhan", "--port", str(chuzhan_port),
                          "--latency", str(latency), "--token-file", str(token_file)], chuzhan_log)
    tencent_pid = _spawn([sys.executable, "-m", "sandbox.serve", "tencent", "--port", str(tencent_port),
                          "--latency", str(latency), "--secret-id", tencent_id, "--token-file", str(tencent_key_file)],
                         tencent_log)
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                            "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                                            "admin.port.grpc")}
    ports["s3.port"] = s3_port
    s3_pid = _spawn(weed_command(state_dir / "s3-data", s3_config, ports), s3_log)
    state = SandboxState(state_dir=str(state_dir), tams_url=f"http://127.0.0.1:{tams_port}", tams_app_id=app_id,
                         tams_private_key_file=str(private_file), chuzhan_url=f"http://127.0.0.1:{chuzhan_port}",
                         chuzhan_token_file=str(token_file), tencent_url=f"http://127.0.0.1:{tencent_port}",
                         tencent_secret_id=tencent_id, tencent_secret_key_file=str(tencent_key_file),
                         s3_url=f"http://127.0.0.1:{s3_port}",
                         s3_access_key=access_key, s3_secret_key=secret_key, buckets=list(buckets),
                         pids={"tams": tams_pid, "chuzhan": chuzhan_pid, "tencent": tencent_pid, "s3": s3_pid},
                         tams_token_file=str(tams_token_file))
    state.save()
    try:
        _wait_http(f"{state.tams_url}/_sandbox/health", tams_pid, tams_log)
        _wait_http(f"{state.chuzhan_url}/_sandbox/health", chuzhan_pid, chuzhan_log)
        _wait_http(f"{state.tencent_url}/_sandbox/health", tencent_pid, tencent_log)
        _wait_http(state.s3_url, s3_pid, s3_log)
        _create_buckets(state)
    except Exception:
        down(state_dir)
        raise
    return state


def _create_buckets(state: SandboxState, timeout: float = 30.0) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=state.s3_url, aws_access_key_id=state.s3_access_key,
                          aws_secret_access_key=state.s3_secret_key, region_name="us-east-1",
                          config=Config(signature_version="s3v4", retries={"max_attempts": 1}))
    deadline = time.monotonic() + timeout
    for bucket in state.buckets:
        while True:  # the filer may answer before it accepts writes
            try:
                client.create_bucket(Bucket=bucket)
                break
            except client.exceptions.BucketAlreadyOwnedByYou:
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def down(state_dir: Path = DEFAULT_STATE_DIR) -> bool:
    """Stop the sandbox's processes; False when none was running."""
    state = SandboxState.load(Path(state_dir).resolve())
    if state is None:
        return False
    for pid in state.pids.values():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(pid):
                break
    state.pids = {}
    state.save()
    return True


def register_blocks(state: SandboxState, name: str = BLOCK_NAME) -> list[str]:
    """Save a provider Block per emulator and an AwsCredentials Block, all named `name`."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from blocks.chuzhan import ChuzhanProvider
    from blocks.tams import TamsProvider
    from blocks.tencent import TencentAiArtProvider

    TamsProvider(app_id=state.tams_app_id, private_key=state.tams_private_key(),
                 endpoint=state.tams_url).save(name, overwrite=True)
    ChuzhanProvider(api_token=state.chuzhan_token(), endpoint=state.chuzhan_url).save(name, overwrite=True)
    TencentAiArtProvider(secret_id=state.tencent_secret_id, secret_key=state.tencent_secret_key(),
                         endpoint=state.tencent_url).save(name, overwrite=True)
    AwsCredentials(aws_access_key_id=state.s3_access_key, aws_secret_access_key=state.s3_secret_key,
                   region_name="us-east-1",
                   aws_client_parameters=AwsClientParameters(endpoint_url=state.s3_url)).save(name, overwrite=True)
    return [f"tams-provider/{name}", f"chuzhan-provider/{name}", f"tencent-aiart-provider/{name}",
            f"aws-credentials/{name}"]
