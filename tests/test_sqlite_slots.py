"""A SQLite Prefect server's slot calls: the limits' read begins the write transaction IMMEDIATE,
so a write that commits beside a slot call waits for it instead of making it refused as
"database is locked" (deployments/sqlite_slots.py). Prefect's own slot-taking code, on its own
SQLite configuration, on a real database file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prefect.server.api import concurrency_limits_v2 as api
from prefect.server.database import configurations
from prefect.server.database.dependencies import provide_database_interface
from prefect.server.models import concurrency_limits_v2 as models

from deployments import sqlite_slots

LIMIT = "rate:tams"


async def _database(path: Path) -> tuple[Any, Any]:
    """Prefect's SQLite configuration on `path`, with one limit of 5 slots and a table of others' writes."""
    config = configurations.AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{path}")
    engine = await config.engine()
    db = provide_database_interface()
    async with engine.begin() as connection:
        await connection.run_sync(db.ConcurrencyLimitV2.__table__.create)
        await connection.exec_driver_sql("CREATE TABLE other_writes (x INTEGER)")
    async with await config.session(engine) as session, config.begin_transaction(session):
        session.add(db.ConcurrencyLimitV2(name=LIMIT, limit=5, active=True, slot_decay_per_second=5.0))
    return config, engine


async def _take_slot_while_another_write_commits(path: Path, give_it: float | None) -> tuple[bool, int]:
    """Prefect's slot-taking transaction, with another connection's write begun right after its
    read and given `give_it` seconds to commit first (None: until it has); returns whether the
    slot was granted and the other writes committed in the end."""
    config, engine = await _database(path)
    read = models.bulk_read_concurrency_limits
    others: list[asyncio.Task[None]] = []

    async def other_write() -> None:
        async with await config.session(engine) as session, config.begin_transaction(session):
            await session.execute(sa.text("INSERT INTO other_writes VALUES (1)"))

    async def read_then_let_another_write_commit(**kwargs: Any) -> Any:
        limits = await read(**kwargs)
        others.append(asyncio.create_task(other_write()))
        await asyncio.wait([others[0]], timeout=give_it)  # commits at once unless the read took the write lock
        return limits

    models.bulk_read_concurrency_limits = read_then_let_another_write_commit
    try:
        async with await config.session(engine) as session, config.begin_transaction(session):
            _, acquired = await api._acquire_concurrency_slots(session, [LIMIT], 1, "rate_limit")
    finally:
        models.bulk_read_concurrency_limits = read
        await asyncio.gather(*others)
    async with engine.connect() as connection:
        written = (await connection.exec_driver_sql("SELECT count(*) FROM other_writes")).scalar_one()
    await engine.dispose()
    return acquired, written


def test_a_slot_is_granted_while_another_write_commits_beside_it(tmp_path) -> None:
    """Installed: the other write waits for the slot's transaction, then commits; both go through."""
    assert sqlite_slots.install()
    assert asyncio.run(_take_slot_while_another_write_commits(tmp_path / "db.sqlite", give_it=1.0)) == (True, 1)


def test_without_it_a_write_beside_the_slot_call_gets_it_refused_as_locked(tmp_path, monkeypatch) -> None:
    """The reason for it: Prefect's DEFERRED slot transaction, left as it is, is refused at once
    (a stale snapshot, which the busy timeout does not wait out); the server answers 503."""
    sqlite_slots.install()
    monkeypatch.setattr(models, "bulk_read_concurrency_limits", models.bulk_read_concurrency_limits.__wrapped__)
    with pytest.raises(sa.exc.OperationalError, match="database is locked"):
        asyncio.run(_take_slot_while_another_write_commits(tmp_path / "db.sqlite", give_it=None))


def test_a_read_outside_a_write_transaction_begins_no_transaction(tmp_path) -> None:
    """Read endpoints (no write transaction) are left as Prefect has them."""
    assert sqlite_slots.install()
    seen: list[Any] = []

    async def recording(**kwargs: Any) -> list[Any]:
        seen.append(configurations.SQLITE_BEGIN_MODE.get())
        return []

    async def scenario() -> None:
        wrapped = sqlite_slots.beginning_immediate(recording, configurations.SQLITE_BEGIN_MODE)
        await wrapped()
        token = configurations.SQLITE_BEGIN_MODE.set("DEFERRED")
        await wrapped()
        assert configurations.SQLITE_BEGIN_MODE.get() == "DEFERRED"  # set back after the read
        configurations.SQLITE_BEGIN_MODE.reset(token)

    asyncio.run(scenario())
    assert seen == [None, "IMMEDIATE"]


def test_installing_twice_wraps_once() -> None:
    sqlite_slots.install()
    once = models.bulk_read_concurrency_limits
    assert sqlite_slots.install()
    assert models.bulk_read_concurrency_limits is once


def test_a_process_without_prefect_s_server_is_left_as_it_is() -> None:
    """Loaded as a Prefect collection in flow and worker processes too: there it imports nothing."""
    code = ("import sys, prefect, deployments.sqlite_slots as s; "
            "print(s.install(), 'prefect.server.models.concurrency_limits_v2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_prefect_server_here_loads_it_when_it_imports_its_collections() -> None:
    """A server imports its collections at start (to register Blocks), with its own modules loaded:
    this project's entry point then patches the slot calls' read."""
    code = ("import prefect.plugins, prefect.server.api.server; "
            "from prefect.server.models import concurrency_limits_v2 as m; "
            "prefect.plugins.load_prefect_collections(); "
            f"print(getattr(m.bulk_read_concurrency_limits, {sqlite_slots.MARK!r}, False))")
    assert "deployments.sqlite_slots" in {e.value for e in entry_points(group="prefect.collections")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split()[-1:] == ["True"], out.stderr[-2000:]
