"""The flows, their tasks, the spec loader and the `imagegen` CLI.

Importing this package before Prefect selects Prefect's filesystem lease storage when nothing
else was chosen and no `PREFECT_API_URL` is set, i.e. for the temporary server every `imagegen
run` starts on its own: its concurrency leases then live in `PREFECT_HOME` instead of that
server's memory, so a killed run's slots can be found and freed by the next run
(`flows.slots.reclaim_expired`) instead of staying held for good.
"""

from __future__ import annotations

import os

LEASE_STORAGE_SETTING = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"

if LEASE_STORAGE_SETTING not in os.environ and not os.environ.get("PREFECT_API_URL"):
    os.environ[LEASE_STORAGE_SETTING] = "prefect.server.concurrency.lease_storage.filesystem"
