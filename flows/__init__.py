"""The flows and the `imagegen` CLI, over four packages, each importing only those before it:

- `flows.storage`: the archive's key layout and every S3 call (beneath all the others);
- `flows.specs`: reading specs and catalogues;
- `flows.models`: the values one step hands the next (a module of its own);
- `flows.paying`: paying once (ledger, the paid step's owner, claims, limits, budget, callbacks);
- `flows.imaging`: image work and review;
- `flows.running`: the Prefect tasks, progress and the report;
- `flows.pipeline` and `flows.backfill`: the flows (the deployments' entry points), and
  `flows.cli`: the `imagegen` command, on top (`flows.tempserver`: the temporary Prefect server it starts).

Imports inside functions are of Prefect, prefect-aws, optional packages (moderation, Real-ESRGAN)
and, in `flows.cli`, of the layers a command needs: kept out of the start-up of commands that
need none of them (`imagegen validate` answers in about a second).

Importing this package before Prefect sets defaults for the temporary Prefect server that
any process without `PREFECT_API_URL` starts on its own (`imagegen run`, the CLI's other
commands, a local backfill). A value the user set is never changed.

- Its concurrency leases live in `PREFECT_HOME` (Prefect's filesystem lease storage) instead
  of the server's memory, so a killed run's slots can be found and freed by the next run
  (`flows.paying.slots.reclaim_expired`) instead of staying held for good.
- It is given `STARTUP_SECONDS` to answer instead of Prefect's 20 s: its first start on a new
  `PREFECT_HOME` creates and migrates the SQLite database, which took longer than 20 s on a
  busy two-core machine every time (the user's first command then failed).
- Its telemetry is off: the heartbeat competes with the run for SQLite's lock and prints a
  `database is locked` traceback on every command.
- `SERVER_TUNING`: its task-run recorder writes task runs in batches instead of one
  transaction per event (Prefect's default), which SQLite serialises. Every server this
  project starts (`imagegen server up`, the benchmark's) gets the same settings.

It also caps the process's malloc arenas (`flows.arenas`): a run's 64 task threads otherwise
keep 16 of them, about a fifth of its peak memory.
"""

from __future__ import annotations

import os

LEASE_STORAGE_SETTING = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_SECONDS = 300
SERVER_TUNING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}
"""Server settings for bulk runs (a user's own value of any of them is kept)."""

if not os.environ.get("PREFECT_API_URL"):
    os.environ.setdefault(LEASE_STORAGE_SETTING, "prefect.server.concurrency.lease_storage.filesystem")
    os.environ.setdefault(STARTUP_SETTING, str(STARTUP_SECONDS))
    for _name, _value in SERVER_TUNING.items():
        os.environ.setdefault(_name, _value)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from flows.arenas import fix_mmap_threshold, limit_malloc_arenas  # noqa: E402 - after the settings above

limit_malloc_arenas()
fix_mmap_threshold()
