"""Lets a SQLite Prefect server grant a limit's slot without refusing it as "database is locked".

Prefect 3.8.8 takes a slot of a global concurrency or rate limit in one transaction that first
reads the limits, then updates their active slots. On SQLite that transaction is DEFERRED: the
read takes a snapshot, and if any other write commits before the update (a task run's state, a
log, another slot), SQLite refuses the update at once (a stale snapshot, which its busy timeout
does not wait out). Prefect answers 503, and its client asks again after a 2 s back-off, while
this process's whole provider lane waits for that one rate slot. Begun IMMEDIATE instead, the
transaction takes the write lock before it reads, so it waits its turn behind the other writes
(milliseconds) and is never refused for a stale snapshot. That is what Prefect itself does for
its other read-then-write transactions (`with_for_update`).

`install()` makes the limits' read begin IMMEDIATE wherever a write transaction is about to
begin with it: the slot calls (`/increment`, `/increment-with-lease`, `/decrement`). Reads
outside a write transaction, and PostgreSQL, are unchanged. It patches only a process that has
already imported Prefect's server (the entry point that loads it runs when a server starts), so
flow and worker processes import nothing more. Measured in README.md's Performance section.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

MODELS = "prefect.server.models.concurrency_limits_v2"
CONFIGURATIONS = "prefect.server.database.configurations"
READ = "bulk_read_concurrency_limits"
MARK = "__imagegen_begins_immediate__"

log = logging.getLogger(__name__)


def beginning_immediate(read: Callable[..., Awaitable[Any]], mode: Any) -> Callable[..., Awaitable[Any]]:
    """`read`, begun IMMEDIATE when it is the first statement of a DEFERRED write transaction
    (`mode` is Prefect's context variable that its SQLite BEGIN reads)."""

    @functools.wraps(read)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = mode.set("IMMEDIATE") if mode.get() == "DEFERRED" else None
        try:
            return await read(*args, **kwargs)
        finally:
            if token is not None:
                mode.reset(token)

    setattr(wrapper, MARK, True)
    return wrapper


def install() -> bool:
    """Patch the limits' read (once) if Prefect's server is imported here; False where it is not,
    or is not the Prefect this knows."""
    models, configurations = sys.modules.get(MODELS), sys.modules.get(CONFIGURATIONS)
    if models is None or configurations is None:
        return False
    read, mode = getattr(models, READ, None), getattr(configurations, "SQLITE_BEGIN_MODE", None)
    if read is None or mode is None:
        log.warning("this Prefect server is not the one imagegen-pipelines knows: on SQLite, its slot calls may "
                    "be refused (503) when other writes commit beside them")
        return False
    if not getattr(read, MARK, False):
        setattr(models, READ, beginning_immediate(read, mode))
    return True


install()
