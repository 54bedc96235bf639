"""A PostgreSQL cluster of its own for a Prefect server (Debian's `postgresql`): the
benchmark's (in a temp dir) and `imagegen server up`'s (in the server's directory, kept).

Prefect's server on SQLite answers 503 ("database is locked") when task-run events and limit
slots are written at the same time, and its client then backs off about 2 s; PostgreSQL does
not lock that way. The cluster listens on loopback only. As root, the server runs as the
`postgres` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from sandbox.launcher import free_port


def binaries() -> Path | None:
    """The newest installed PostgreSQL bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Cluster:
    """`start()` returns the SQLAlchemy URL of a fresh `prefect` database; `stop()` ends it."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql); "
                               "or use SQLite (--database sqlite)")
        self.bin, self.root, self.port = bin_dir, root, port or free_port()
        self.data = root / "data"

    def reachable(self) -> bool:
        """True when the server's user can reach the cluster's directory (as root it runs as
        `postgres`, which cannot enter a private directory such as a pytest temp dir)."""
        if os.geteuid() != 0:
            return True
        probe = self.root if self.root.exists() else self.root.parent
        return subprocess.run(_as_owner(["test", "-x", str(probe)]), capture_output=True).returncode == 0

    def start(self) -> str:
        """Start the cluster (made on first use, kept after); return the `prefect` database's URL."""
        fresh = not self.data.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        if fresh:
            subprocess.run(_as_owner([str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U",
                                      "postgres"]), check=True, capture_output=True)
        subprocess.run(_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.root / "log"),
                                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                                        "-c max_connections=200", "start"]), check=True, capture_output=True)
        if fresh:
            subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                            "prefect"], check=True, capture_output=True)
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(_as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
                           capture_output=True)
