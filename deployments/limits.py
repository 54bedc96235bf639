"""Provider limits as code, held on the Prefect server (setup; the model and the names are
`flows.paying.limits`).

`apply_limits()` upserts one Prefect global concurrency limit per declared rate (a limit of 1
whose slot decays `rate x safety` times a second, so requests are spaced, not burst) and per
declared in-flight cap; `show_limits()` and `reset_limit()` are `imagegen limits show/reset`.
Taking slots at run time is `flows/paying/slots.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from flows.paying.limits import LIMITS_FILE, load_limits, wanted_limits


def apply_limits(accounts: dict[str, list[str]] | None = None, path: Path = LIMITS_FILE) -> dict[str, tuple[int, float | None]]:
    """Create or update the limits on the current Prefect API; return what was applied."""
    from prefect.client.orchestration import get_client

    wanted = wanted_limits(load_limits(path), accounts)
    with get_client(sync_client=True) as client:
        for name, (limit, decay) in wanted.items():
            client.upsert_global_concurrency_limit_by_name(name, limit, decay if decay is not None else 0.0)
    return wanted


def leased_slots(storage: Path, now: datetime | None = None) -> dict[str, int]:
    """Limit id -> slots held by live (unexpired) leases in a filesystem lease storage (the
    `concurrency_leases` folder of the server's `PREFECT_HOME`). Unreadable files count as none."""
    now = now or datetime.now(timezone.utc)
    held: dict[str, int] = {}
    for path in storage.glob("*.json"):
        if path.name == "expirations.json":
            continue
        try:
            lease = json.loads(path.read_text())
            if datetime.fromisoformat(lease["expiration"]) <= now:
                continue
            for limit_id in lease["resource_ids"]:
                held[limit_id] = held.get(limit_id, 0) + int((lease.get("metadata") or {}).get("slots", 1))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced or removed right now
    return held


def _read_imagegen_limits(client) -> list:  # noqa: ANN001
    found, offset = [], 0
    while True:
        page = client.read_global_concurrency_limits(limit=200, offset=offset)
        found += [l for l in page if l.name.startswith("imagegen:")]
        if len(page) < 200:
            return found
        offset += 200


def show_limits(leases: Path | None = None, reclaim: Callable[[], object] | None = None) -> list[dict[str, object]]:
    """The imagegen limits on the current Prefect API with their current usage (the slots of
    expired leases freed first by `reclaim`, which the run-time layer passes: `flows.paying.slots`
    builds on this module, not the other way). Run claims
    (`imagegen:run:<pipeline>:<date>`, one per date ever run) are listed only while held.

    With `leases` (the server's filesystem lease storage), each in-flight limit also gets
    `unleased`: the slots the database counts that no live lease holds. Such slots belong to no
    one (a lease lost by a server with in-memory lease storage) and stay held until reset. The
    limits are read before and after the leases, so a slot taken or released meanwhile is not
    counted as unleased."""
    from prefect.client.orchestration import get_client

    if reclaim is not None:
        reclaim()
    with get_client(sync_client=True) as client:
        before = _read_imagegen_limits(client)
        held = leased_slots(leases) if leases is not None and leases.is_dir() else None
        after = {l.name: l.active_slots for l in _read_imagegen_limits(client)} if held is not None else {}
    rows = []
    for l in before:
        if l.name.startswith("imagegen:run:") and not l.active_slots:
            continue  # claims: only held
        row: dict[str, object] = {"name": l.name, "limit": l.limit, "active_slots": l.active_slots,
                                  "slot_decay_per_second": l.slot_decay_per_second, "active": l.active}
        if held is not None and not l.slot_decay_per_second:  # rate limits decay: they hold no leases
            row["unleased"] = max(0, min(l.active_slots, after.get(l.name, 0)) - held.get(str(l.id), 0))
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["name"]))


def reset_limit(name: str) -> int:
    """Set the active slots of limit `name` to 0; return how many were held. For slots no live
    holder has (a lease lost with an in-memory lease storage): a live holder's job would then
    run beside a new one, so ask a person first (`imagegen limits reset` does)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        held = client.read_global_concurrency_limit_by_name(name).active_slots
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    return held


def limits_in_use(leases: Path | None = None) -> list[dict[str, object]]:
    """`show_limits`, the slots of expired leases freed first (`flows.paying.slots.reclaim_expired`)."""
    from flows.paying.slots import reclaim_expired  # imports Prefect's client: only when asked

    return show_limits(leases, reclaim=lambda: reclaim_expired(force=True))
