"""`imagegen server up|down|status`: a local Prefect server ready for bulk runs, in one command.

- **Leases on disk.** Prefect keeps concurrency leases in memory by default. A server restarted
  while a job slot was held then forgets the lease but still counts the slot, and nothing frees
  it. Here the server uses Prefect's filesystem lease storage in its own `PREFECT_HOME`, so such
  a slot is freed when its lease expires (at most one lease period, 60 s for job slots).
- **PostgreSQL** (Debian's `postgresql`, a cluster kept in the server's directory) when it is
  installed, else SQLite, which stalls under limit traffic ("database is locked").
- **Events kept `EVENTS_RETENTION`**, enough to look back over a week of nightly batches of
  thousands of task runs without the database growing for good.

Everything lives in one directory (`.prefect-server/` by default): `state.json`, the server's
home and log, the PostgreSQL cluster. `down` stops the server and the cluster and keeps the
data; `up` again finds it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from deployments.processes import alive, answers, spawn, stop, wait_until
from flows import SERVER_TUNING


DEFAULT_DIR = Path(".prefect-server")
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
EVENTS_RETENTION = "7d"


class ServerError(RuntimeError):
    """The server could not start (its log says why)."""


@dataclass
class ServerState:
    """A server `up` started: where it answers and what runs it."""

    root: str
    port: int
    pid: int
    database: str  # "postgres" or "sqlite"
    postgres_port: int | None = None
    host: str = "127.0.0.1"  # where it listens; 0.0.0.0 for workers on other machines

    @property
    def api_url(self) -> str:
        """The URL to export: on this machine's name when it listens on every interface."""
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/api"

    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api" if self.host in ("0.0.0.0", "::") else self.api_url

    @property
    def home(self) -> Path:
        return Path(self.root) / "home"

    def save(self) -> None:
        (Path(self.root) / "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: Path) -> ServerState | None:
        try:
            return cls(**json.loads((Path(root) / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


def server_env(home: Path, database_url: str | None) -> dict[str, str]:
    """The environment of the server process: its home, durable leases, retention, database."""
    keep = ("PREFECT_SERVER_API_AUTH_STRING",  # basic auth, for a server other machines reach
            "PREFECT_SERVER_UI_V2_ENABLED", "PREFECT_UI_API_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k in keep}
    # The classic UI unless the user chose: the review form's images render there (the V2 UI of
    # 3.8.8 shows a field description's HTML as text; docs/what-you-see.md).
    env.setdefault("PREFECT_SERVER_UI_V2_ENABLED", "false")
    env.update({k: os.environ.get(k, v) for k, v in SERVER_TUNING.items()})
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILESYSTEM_LEASES,
                "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": EVENTS_RETENTION,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    return env


def replica_env(database_url: str, redis_url: str, home: Path) -> dict[str, str]:
    """The environment of one process of a replicated server (every `prefect server start
    --no-services` replica and the `prefect server services start` process alike), as Prefect
    documents it for a scaled self-hosted server: one PostgreSQL database, migrations run once
    beforehand (`prefect server database upgrade -y`), and Redis (`prefect-redis`, the `redis`
    extra) for messaging, the message cache, the events' causal ordering, the concurrency
    leases and the background services' docket. A slot taken through one replica is renewed
    and released through any other; with leases in each replica's memory it would leak."""
    from urllib.parse import urlsplit

    redis = urlsplit(redis_url)
    host, port = redis.hostname or "127.0.0.1", redis.port or 6379
    env = server_env(home, database_url)  # this server's own settings, with leases in Redis instead
    env.update({
        "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": host,
        "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_REDIS_MESSAGING_DB": "0",
        "PREFECT_SERVER_DOCKET_URL": f"redis://{host}:{port}/1",
    })
    return env


def running(state: ServerState | None) -> bool:
    if state is None:
        return False
    return alive(state.pid) and answers(f"{state.local_url}/health")()


def port_free(host: str, port: int) -> None:
    """`ServerError` when `port` is taken on `host`: the server would exit at once, while the
    one holding the port answered the health check, so `up` reported the wrong server as its own."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: not fooled by TIME_WAIT
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(f"port {port} on {host} is in use ({exc.strerror}): another server holds it "
                              "(`imagegen server status --dir DIR` for one of ours); choose another with --port") from None


def up(root: Path = DEFAULT_DIR, port: int = 4200, database: str = "auto", timeout: float = 180.0,
       host: str = "127.0.0.1") -> ServerState:
    """Start the server (and its PostgreSQL cluster) unless it already runs; wait until it answers."""
    from deployments.postgres import Cluster, binaries

    root = Path(root).resolve()
    known = ServerState.load(root)
    if known is not None and running(known):
        return known
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # PostgreSQL runs as its own user and must reach its directory
    chosen = database != "auto" or (known is not None and known.database == "postgres")
    if database == "auto":
        database = known.database if known else ("postgres" if binaries() else "sqlite")
    url, pg_port = None, None
    if database == "postgres":
        cluster = Cluster(root / "postgres", port=known.postgres_port if known else None)
        if not cluster.reachable():
            if not chosen:  # asked for nothing in particular, and nothing kept there yet: SQLite will do
                print(f"note: PostgreSQL (running as user postgres) cannot reach {root}; using SQLite. For "
                      "PostgreSQL, give --dir a directory it can reach.", file=sys.stderr)
                database = "sqlite"
            else:
                raise ServerError(f"PostgreSQL (running as user postgres) cannot reach {root}")
        if database == "postgres":
            print(f"starting PostgreSQL in {root / 'postgres'} (its first start creates the cluster)",
                  file=sys.stderr, flush=True)
            url, pg_port = cluster.start(), cluster.port
    port_free(host, port)
    home = root / "home"
    print(f"starting the Prefect server on {host}:{port} ({database}; a first start creates its database, up to a "
          f"minute); log {root / 'server.log'}", file=sys.stderr, flush=True)
    home.mkdir(exist_ok=True)
    state = ServerState(str(root), port, 0, database, pg_port, host)  # its pid once started
    env = server_env(home, url)
    # Its UI asks the API it is served with (Prefect's default is :4200 whatever the port).
    env.setdefault("PREFECT_UI_API_URL", state.api_url)
    proc = spawn([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host, "--port", str(port)],
                 root / "server.log", env=env)
    state.pid = proc.pid
    state.save()
    wait_until(lambda: running(state), proc.pid, root / "server.log", what="the Prefect server", timeout=timeout,
               error=ServerError)
    return state


def down(root: Path = DEFAULT_DIR) -> bool:
    """Stop the server and its cluster; keep their data. False when none was started here."""
    from deployments.postgres import Cluster, binaries

    state = ServerState.load(Path(root).resolve())
    if state is None:
        return False
    stop(state.pid)
    if state.database == "postgres" and binaries():
        Cluster(Path(state.root) / "postgres", port=state.postgres_port).stop()
    return True
