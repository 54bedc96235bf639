"""What every emulator shares: its app, made of the provider's own routes and the sandbox's
hooks, which no real provider has and which need no auth:

- `GET /_sandbox/health`: 200 once it serves, with its process id (what `imagegen sandbox up`
  waits for: this emulator's answer, not another server's that took its port first);
- `GET /_sandbox/stats`: its counters and what it charged (the tests' witness);
- `POST /_sandbox/config`: latency, balance and the like;
- `POST /_sandbox/faults` (`DELETE` clears): faults for the next matching requests.

What a real service would still know after the sandbox is stopped and started again (its jobs,
what it charged, the result URLs it signed: the fields an emulator names in `KEPT`) is written to
a file at shutdown and read back at start (`keep`, `restore`; `python -m sandbox.serve --keep`),
so a run interrupted before a restart finds its jobs, as it would at the provider.

An emulator subclasses `Emulator`, gives `provider_routes()` and the three hooks' handlers,
and builds its app with `build_app()`. It implements its provider's rules from the provider's
document and imports none of the client's code."""

from __future__ import annotations

import os
import pickle
import time
from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Iterable
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def end_sooner(jobs: Iterable[Any], latency: float) -> None:
    """A latency set lower ends each running job (`created`, `duration`) within it from now; one
    set higher leaves them as they are, and a job over stays over: a real service never runs a
    finished job again (a job read against the new latency would, and take a job slot again)."""
    now = time.monotonic()
    for job in jobs:
        elapsed = now - job.created
        if elapsed < job.duration:
            job.duration = min(job.duration, elapsed + latency)


class Emulator(ABC):
    """An emulated provider account's app: its routes, then the sandbox's hooks."""

    app: Starlette
    state: Any
    KEPT: ClassVar[tuple[str, ...]] = ()  # the `state` fields a real service keeps across our restarts

    @abstractmethod
    def provider_routes(self) -> list[Route]:
        """The provider's own API (and the result URLs it hands out)."""

    @abstractmethod
    async def stats(self, request: Request) -> Response:
        """`GET /_sandbox/stats`."""

    @abstractmethod
    async def config(self, request: Request) -> Response:
        """`POST /_sandbox/config`."""

    @abstractmethod
    async def set_faults(self, request: Request) -> Response:
        """`POST` / `DELETE /_sandbox/faults`."""

    async def health(self, request: Request) -> Response:
        """`GET /_sandbox/health`: ok, and which process answers."""
        return JSONResponse({"ok": True, "pid": os.getpid()})

    def keep(self, path: Path) -> None:
        """Write the `KEPT` fields of the state to `path` (readable by this user only)."""
        if not self.KEPT:
            return
        temporary = path.with_name(path.name + ".tmp")
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            pickle.dump({name: getattr(self.state, name) for name in self.KEPT}, out)
        temporary.replace(path)

    def restore(self, path: Path) -> None:
        """Read back what `keep` wrote, if this user alone could have written it. A job started
        before the machine restarted (its monotonic clock with it) starts again now."""
        try:
            info = path.stat()
        except FileNotFoundError:
            return
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise RuntimeError(f"{path} is not this user's alone: remove it (the sandbox then starts empty)")
        with path.open("rb") as kept:
            fields = pickle.load(kept)  # noqa: S301 - written by `keep`, in the user's own sandbox dir
        now = time.monotonic()
        for name in self.KEPT:
            if name in fields:
                setattr(self.state, name, fields[name])
                for value in (fields[name].values() if isinstance(fields[name], dict) else ()):
                    if getattr(value, "created", None) is not None and value.created > now:
                        value.created = now

    def build_app(self) -> Starlette:
        app = self._app()
        app.state.emulator = self
        return app

    def _app(self) -> Starlette:
        return Starlette(routes=[
            *self.provider_routes(),
            Route("/_sandbox/stats", self.stats, methods=["GET"]),
            Route("/_sandbox/config", self.config, methods=["POST"]),
            Route("/_sandbox/faults", self.set_faults, methods=["POST", "DELETE"]),
            Route("/_sandbox/health", self.health, methods=["GET"]),
        ])
