"""Prepare a Prefect server for this project's deployments: the process work pool that
`prefect.yaml` names, and every provider limit of `limits.yaml`. Idempotent.

    imagegen setup-server            # then: prefect --no-prompt deploy --all
"""

from __future__ import annotations

POOL = "imagegen-process"


def setup_server(pool: str = POOL, accounts: dict[str, list[str]] | None = None) -> list[str]:
    """Create the work pool if missing and apply the limits; return what was done."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from deployments.limits import apply_limits

    done = []
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            done.append(f"work pool {pool} exists")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description="imagegen-pipelines: one subprocess per flow run"))
            done.append(f"work pool {pool} created (type process)")
    done += [f"limit {name}" for name in apply_limits(accounts)]
    return done
