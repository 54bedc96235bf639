"""What every emulator shares: its app, made of the provider's own routes and the sandbox's
hooks, which no real provider has and which need no auth:

- `GET /_sandbox/health`: 200 once it serves (what `imagegen sandbox up` waits for);
- `GET /_sandbox/stats`: its counters and what it charged (the tests' witness);
- `POST /_sandbox/config`: latency, balance and the like;
- `POST /_sandbox/faults` (`DELETE` clears): faults for the next matching requests.

An emulator subclasses `Emulator`, gives `provider_routes()` and the three hooks' handlers,
and builds its app with `build_app()`. It implements its provider's rules from the provider's
document and imports none of the client's code."""

from __future__ import annotations

from abc import ABC, abstractmethod

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class Emulator(ABC):
    """An emulated provider account's app: its routes, then the sandbox's hooks."""

    app: Starlette

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
        """`GET /_sandbox/health`."""
        return JSONResponse({"ok": True})

    def build_app(self) -> Starlette:
        return Starlette(routes=[
            *self.provider_routes(),
            Route("/_sandbox/stats", self.stats, methods=["GET"]),
            Route("/_sandbox/config", self.config, methods=["POST"]),
            Route("/_sandbox/faults", self.set_faults, methods=["POST", "DELETE"]),
            Route("/_sandbox/health", self.health, methods=["GET"]),
        ])
