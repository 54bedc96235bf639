"""Keeps a SQLite Prefect server answering while its database is busy.

Prefect's SQLite server runs each database connection on a thread of its own (aiosqlite), and
SQLAlchemy closes a query's cursor only when the query succeeds. A query that fails (`database
is locked`) or whose request is cancelled (a client that timed out) leaves its cursor open, and
Python frees that cursor later wherever its garbage collector happens to run: on the event loop's
thread. Freeing an open cursor resets its statement, which needs its connection; a connection
that is waiting for the database's write lock keeps itself for up to Prefect's busy timeout of
60 s; and the transaction it waits for cannot end while the event loop is stopped. So every
request, a lease renewal and `/api/health` included, waits a minute, and a failed wait leaves
another open cursor behind for the next minute (measured: docs/paying-once.md).

`install()` closes such a cursor on its own connection's thread, queued behind the call that
failed, so the event loop is never left a cursor to reset. It is loaded into every Prefect
process of this environment by this project's `prefect.collections` entry point (a Prefect
server imports those at start, to register Blocks), so the temporary server, `imagegen server
up`, the benchmark's and the tests' servers all have it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

CALLS = ("execute", "executemany", "executescript", "fetchone", "fetchmany", "fetchall")
MARK = "__imagegen_closes_on_failure__"

log = logging.getLogger(__name__)


def close_on_its_thread(cursor: Any) -> None:
    """Queue `cursor`'s close on its connection's thread (after whatever is queued there). It
    never raises: it runs while the call's own error is on its way to the caller."""
    try:
        connection = cursor._conn
        if connection._running:  # a stopped connection's thread is gone; its statements go with it
            connection._tx.put_nowait((None, cursor._cursor.close))
    except Exception:  # an aiosqlite this does not know: the cursor is left as before
        log.debug("could not queue the close of an aiosqlite cursor", exc_info=True)


def closing_on_failure(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`call` (a cursor method), closing the cursor on its thread if the call raises or is cancelled."""

    @functools.wraps(call)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await call(self, *args, **kwargs)
        except BaseException:
            close_on_its_thread(self)
            raise

    setattr(wrapper, MARK, True)
    return wrapper


def install() -> bool:
    """Wrap aiosqlite's cursor calls (once); False where aiosqlite is missing or not the one this knows."""
    try:
        import aiosqlite
        from aiosqlite.cursor import Cursor
    except ImportError:
        return False
    if not all(hasattr(Cursor, name) for name in CALLS):
        log.warning("aiosqlite %s is not the one this project knows: a SQLite Prefect server may stop answering "
                    "for a minute when its database is busy", getattr(aiosqlite, "__version__", "?"))
        return False
    for name in CALLS:
        call = getattr(Cursor, name)
        if not getattr(call, MARK, False):
            setattr(Cursor, name, closing_on_failure(call))
    return True


install()
