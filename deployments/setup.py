"""Prepare a Prefect server for this project's deployments: the process work pool that
`prefect.yaml` names, every provider limit of `limits.yaml`, the repository the
deployments' pull step clones on a worker (the Prefect variables `imagegen_repository` and
`imagegen_branch`), and the automation that marks a flow run Crashed when its heartbeats stop
(its worker's machine died), so a backfill waiting for it goes on and a rerun can take the
date. Idempotent.

    imagegen setup-server            # then: prefect --no-prompt deploy --all
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

POOL = "imagegen-process"
REPOSITORY_VARIABLE = "imagegen_repository"
BRANCH_VARIABLE = "imagegen_branch"
ROOT = Path(__file__).resolve().parent.parent
ZOMBIE_AUTOMATION = "imagegen: crash flow runs whose heartbeats stopped"
ZOMBIE_AFTER_SECONDS = 90  # three heartbeats missed (prefect.yaml: PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30)
DEPLOYMENT_TAG = "imagegen"  # every deployment of prefect.yaml carries it


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def without_credentials(url: str) -> str:
    """The URL with any user:password@ removed (a Prefect variable is readable by every API user)."""
    parts = urlsplit(url)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def checkout_source(root: Path = ROOT) -> tuple[str, str] | None:
    """What a worker should clone to run this checkout: its `origin` (else the checkout itself)
    and its current branch. None outside a git checkout."""
    if _git(root, "rev-parse", "--git-dir") is None:
        return None
    repository = _git(root, "remote", "get-url", "origin") or str(root)
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    return without_credentials(repository), "" if branch in (None, "HEAD") else branch


class SetupRefused(RuntimeError):
    """What `setup-server` was given would make every deployment run fail: not set."""


def missing_branch(repository: str, branch: str) -> str | None:
    """Why workers could not clone `branch` of `repository` (it has no such branch), or None,
    also where git cannot tell (no git, no answer in 30 s, credentials only the workers have)."""
    try:
        found = subprocess.run(["git", "ls-remote", "--heads", repository, branch], capture_output=True, text=True,
                               timeout=30, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode == 0 and not found.stdout.strip():
        return (f"{without_credentials(repository)} has no branch {branch!r}, so every deployment run would fail "
                "cloning it; give --branch one it has (the workers' repository and branch were left as they were)")
    return None


def set_source(client, repository: str | None, branch: str | None) -> list[str]:  # noqa: ANN001
    """Set the variables the pull step reads: as given, else from this checkout where unset."""
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    current = client.read_variable_by_name(REPOSITORY_VARIABLE)
    if repository is None and current is not None:
        if branch is None:
            return [f"workers clone {current.value} (variable {REPOSITORY_VARIABLE}; --repository changes it)"]
        repository = current.value
    if repository is None:
        found = checkout_source()
        if found is None:
            return [f"variable {REPOSITORY_VARIABLE} not set: {ROOT} is no git checkout; "
                    "pass --repository URL so workers can clone the flows"]
        repository = found[0]
        branch = found[1] if branch is None else branch
    if branch and (missing := missing_branch(repository, branch)) is not None:
        raise SetupRefused(missing)
    values = {REPOSITORY_VARIABLE: without_credentials(repository), BRANCH_VARIABLE: branch or ""}
    for name, value in values.items():
        if client.read_variable_by_name(name) is None:
            client.create_variable(VariableCreate(name=name, value=value))
        else:
            client.update_variable(VariableUpdate(name=name, value=value))
    return [f"workers clone {values[REPOSITORY_VARIABLE]} at {values[BRANCH_VARIABLE] or 'its default branch'}"
            f" (variables {REPOSITORY_VARIABLE}, {BRANCH_VARIABLE})"]


def zombie_automation():  # noqa: ANN201 - an AutomationCore
    """Prefect's documented zombie-run automation, for this project's deployment runs: one that
    went Running or sent a heartbeat, then nothing for `ZOMBIE_AFTER_SECONDS` (no heartbeat, no
    final state, no pause or suspension, e.g. a run waiting for a review decision), is set
    Crashed."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    ends = ("Completed", "Failed", "Cancelled", "Crashed", "Paused", "Suspended")
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run with no heartbeat for {ZOMBIE_AFTER_SECONDS} s (its process or machine died) is "
                    "marked Crashed: whatever waits for it goes on, and a rerun of its date can run.",
        trigger=EventTrigger(
            # Running opens the watch too: a run whose process dies before its first heartbeat
            # reaches the server (events are sent in the background) is caught all the same.
            after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{end}" for end in ends)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only runs of this project's deployments: they send heartbeats (prefect.yaml). A
            # run started elsewhere (`imagegen run`, another project's flows) sends none and
            # must never be taken for dead.
            match_related=[ResourceSpecification({"prefect.resource.role": "deployment"}),
                           ResourceSpecification({"prefect.resource.role": "tag",
                                                         "prefect.resource.id": f"prefect.tag.{DEPLOYMENT_TAG}"})],
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_SECONDS)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {ZOMBIE_AFTER_SECONDS} s: its worker process or "
                                            "machine stopped; run the date again to finish it (nothing paid twice)")])


def ensure_zombie_automation(client) -> str:  # noqa: ANN001
    wanted = zombie_automation()
    found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    if found:
        client.update_automation(found[0].id, wanted)
        return f"automation '{ZOMBIE_AUTOMATION}' updated"
    client.create_automation(wanted)
    return f"automation '{ZOMBIE_AUTOMATION}' created"


def setup_server(pool: str = POOL, accounts: dict[str, list[str]] | None = None,
                 repository: str | None = None, branch: str | None = None) -> list[str]:
    """Create the work pool if missing, apply the limits and name the repository; return what was done."""
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
        done += set_source(client, repository, branch)
        done.append(ensure_zombie_automation(client))
    done += [f"limit {name}" for name in apply_limits(accounts)]
    from flows.paying.callbacks import KEY_BLOCK, callback_key

    callback_key(create=True)
    done.append(f"callback key in the Secret block {KEY_BLOCK} (for `imagegen callbacks serve`)")
    return done
