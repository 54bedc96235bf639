"""A SQLite Prefect server's cursors: one whose query failed or was cancelled is closed on its own
connection's thread, never left for the event loop to free while its connection waits on a lock
(deployments/sqlite_cursors.py). Real aiosqlite connections on a real database file."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
from importlib.metadata import entry_points
from pathlib import Path

import aiosqlite
import pytest

from deployments import sqlite_cursors


async def _locked_database(path: Path) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
    """Two connections to one WAL database: the first holds its write lock, the second waits 0.3 s for it."""
    holder = await aiosqlite.connect(path, isolation_level=None)
    await holder.execute("PRAGMA journal_mode = WAL")
    await holder.execute("CREATE TABLE t (x INTEGER)")
    await holder.execute("INSERT INTO t VALUES (1), (2), (3)")
    await holder.execute("BEGIN IMMEDIATE")
    waiter = await aiosqlite.connect(path, isolation_level=None)
    await waiter.execute("PRAGMA busy_timeout = 300")
    return holder, waiter


def _closed(cursor: aiosqlite.Cursor) -> bool:
    try:
        cursor._cursor.fetchall()
    except sqlite3.ProgrammingError as error:
        return "closed cursor" in str(error)
    return False


def test_a_failed_query_s_cursor_is_closed_on_its_connection_s_thread(tmp_path) -> None:
    """`database is locked` after the busy timeout: the cursor is closed, by the connection's
    thread, once the query's error is raised."""
    assert sqlite_cursors.install()
    closed_on: list[str] = []

    async def scenario() -> None:
        holder, waiter = await _locked_database(tmp_path / "db.sqlite")
        cursor = await waiter.cursor()
        cursor._cursor = _Recording(cursor._cursor, closed_on)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await cursor.execute("INSERT INTO t VALUES (4)")
        await waiter.execute("SELECT 1")  # runs after the queued close
        assert closed_on == [waiter._thread.name]
        await holder.close()
        await waiter.close()

    asyncio.run(scenario())


def test_a_failed_query_s_cursor_does_not_stop_the_event_loop_while_its_connection_waits(tmp_path) -> None:
    """The minute-long stall, in small: a query fails on a busy database and leaves its cursor;
    its connection later waits for the write lock another transaction holds; the event loop frees
    the cursor (as the garbage collector does). That transaction can commit only on the event
    loop, so if freeing the cursor waits for the connection, nothing moves until the busy timeout
    fails the waiting insert."""
    assert sqlite_cursors.install()

    async def scenario() -> None:
        holder, waiter = await _locked_database(tmp_path / "db.sqlite")
        try:
            left = await waiter.cursor()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await left.execute("INSERT INTO t VALUES (4)")
            await waiter.execute("PRAGMA busy_timeout = 20000")
            insert = asyncio.ensure_future(waiter.execute("INSERT INTO t VALUES (6)"))
            while not waiter._tx.empty():  # the insert has reached the connection's thread
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # and waits there for the lock
            del left
            gc.collect()  # on the event loop's thread, as in the server
            await holder.execute("INSERT INTO t VALUES (5)")
            await holder.execute("COMMIT")
            await insert  # within its 20 s busy timeout: the commit was not held up
            assert [row[0] async for row in await waiter.execute("SELECT x FROM t ORDER BY x")] == [1, 2, 3, 5, 6]
        finally:
            await holder.close()
            await waiter.close()

    asyncio.run(scenario())


def test_a_cancelled_fetch_leaves_no_open_statement(tmp_path) -> None:
    """A request cancelled between a query and its rows (a client that gave up): the statement,
    still stepping, is reset on the connection's thread, so freeing the cursor anywhere later
    touches no connection, and the connection's next write is not refused for the rows it
    never read."""
    assert sqlite_cursors.install()

    async def scenario() -> None:
        holder, waiter = await _locked_database(tmp_path / "db.sqlite")
        try:
            await holder.execute("COMMIT")
            left = await waiter.execute("SELECT x FROM t")
            fetch = asyncio.ensure_future(left.fetchone())
            await asyncio.sleep(0)  # the fetch is queued on the connection's thread
            fetch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await fetch
            await holder.execute("INSERT INTO t VALUES (5)")
            await waiter.execute("INSERT INTO t VALUES (6)")
            assert _closed(left)
        finally:
            await holder.close()
            await waiter.close()

    asyncio.run(scenario())


def test_the_call_s_own_error_reaches_the_caller_whatever_the_cursor() -> None:
    """Closing is best effort: a cursor this does not know leaves the call's error as it was."""

    async def fails(self: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError, match="locked") as raised:
        asyncio.run(sqlite_cursors.closing_on_failure(fails)(object()))
    assert raised.value.__context__ is None


def test_every_prefect_process_here_loads_it() -> None:
    """The `prefect.collections` entry point a Prefect server imports at start names the module,
    and installing twice wraps once."""
    assert "deployments.sqlite_cursors" in {e.value for e in entry_points(group="prefect.collections")}
    assert sqlite_cursors.install() and sqlite_cursors.install()
    execute = aiosqlite.Cursor.execute
    assert getattr(execute, sqlite_cursors.MARK) and not getattr(execute.__wrapped__, sqlite_cursors.MARK, False)


class _Recording:
    """A sqlite3 cursor that records the thread its `close` runs on."""

    def __init__(self, cursor: sqlite3.Cursor, closed_on: list[str]) -> None:
        self._cursor, self._closed_on = cursor, closed_on

    def __getattr__(self, name: str) -> object:
        return getattr(self._cursor, name)

    def close(self) -> None:
        self._closed_on.append(threading.current_thread().name)
        self._cursor.close()
