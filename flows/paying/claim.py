"""One run per pipeline and run date at a time, across processes and machines.

The claim is a Prefect global concurrency limit of 1 named `imagegen:run:<pipeline>:<date>`,
held on a lease for the whole run (renewed while the run lives, freed within one lease period
when its process dies, see `flows.paying.slots`). A second run of the same date waits for the
first to finish, logging which flow run it waits for, and then reuses what the first archived:
it never pays for the same item. Held where the provider limits already live, so it needs no
conditional writes from the S3 server.

It fails closed: once the claim's lease is lost (the Prefect server said so, or was away for
longer than the lease), the run logs it in one line and starts no more paid calls
(`flows.paying.paidcalls`), and writes no manifest over the one of the run that may hold the claim
now. While the run holds its claim, SIGHUP stops it between paid calls (`flows.paying.detach`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import date, datetime, timezone

from flows.paying import detach
from flows.paying import paidcalls
from flows.paying.leases import Lease
from flows.paying.limits import LEASE_SECONDS
from flows.paying.slots import api_client, configured_lease, hold
from flows.paying.ledger import JobLedger


def claim_name(pipeline: str, run_date: date) -> str:
    return f"imagegen:run:{pipeline}:{run_date.isoformat()}"


def _ensure_limit(name: str) -> None:
    """Create the claim's limit of 1 if it does not exist (two runs may race to create it)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    client = api_client()
    try:
        client.read_global_concurrency_limit_by_name(name)
        return
    except ObjectNotFound:
        pass
    with contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


@contextlib.contextmanager
def run_claim(pipeline: str, run_date: date, ledger: JobLedger) -> Iterator[None]:
    """Hold the claim of `pipeline` on `run_date` for the block; wait while another run has it."""
    from prefect import get_run_logger
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run

    name = claim_name(pipeline, run_date)
    _ensure_limit(name)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id) if flow_run.id else None

    lease_seconds = configured_lease(LEASE_SECONDS)

    def waiting(waited: float) -> None:
        if waited:  # said again while the wait goes on: a killed run's claim takes up to a lease to free
            get_run_logger().warning("still waiting for the claim of %s for %s: %.0f s so far (at most %.0f s after "
                                     "the other run's last renewal, if it was killed)", pipeline, run_date, waited,
                                     lease_seconds)
            return
        note = ledger.read_claim_note() or {}
        get_run_logger().warning(
            "another run of %s for %s holds its claim (flow run %s %s, started %s); waiting for it to finish, then "
            "items it archived are reused, not paid again (if that run was killed, its claim frees itself at most "
            "%.0f s after its last renewal)", pipeline, run_date, note.get("flow_run_name", "?"),
            note.get("flow_run_id", "?"), note.get("started_at", "?"), lease_seconds)

    logger = get_run_logger()

    def lost(lease: Lease) -> None:
        logger.error("%s", paidcalls.lost_claim_message(lease))

    with hold(name, lease_seconds, holder=holder, on_wait=waiting) as lease:
        lease.on_lost.append(lost)
        ledger.write_claim_note({"flow_run_id": str(flow_run.id) if flow_run.id else None,
                                 "flow_run_name": flow_run.name, "started_at": datetime.now(timezone.utc).isoformat()})
        with paidcalls.claim(flow_run.id, lease), detach.stop_on_hangup(logger):
            yield
