"""The providers' limits as the run takes them: their model, where they are declared, and the
Prefect limit names they become.

`deployments/limits.yaml` declares this project's providers and accounts. A provider package
outside this repository ships its own `limits.yaml` and names its package in the
`imagegen.limits` entry point group; `load_limits()` adds them. `deployments/limits.py`
applies them to a Prefect server (setup); `flows.paying.slots` takes their slots at run time.
"""

from __future__ import annotations

from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

LIMITS_FILE = Path(__file__).resolve().parents[2] / "deployments" / "limits.yaml"
GROUP = "imagegen.limits"  # provider packages: name = the package holding its `limits.yaml`
# The lease of every slot a run holds (its job slots and its date's claim): a crashed holder's
# slot is freed about this long after its last renewal, and a holder whose renewals go unanswered
# this long counts its slot as lost. Three minutes rides out a SQLite Prefect server that stops
# answering for a minute at a time, as one did until deployments/sqlite_cursors.py (docs/paying-once.md).
LEASE_SECONDS = 180


class ProviderLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: dict[str, float] = Field(default_factory=dict, description="requests/second per action")
    jobs: dict[str, int] = Field(default_factory=dict, description="jobs in flight per action")


class LimitsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate_safety: float = Field(0.9, gt=0, le=1)
    providers: dict[str, ProviderLimits]
    accounts: dict[str, list[str]] = Field(default_factory=dict)

    def applied_rate(self, per_second: float) -> float:
        """The rate a limit is held at: the published one times `rate_safety`."""
        return round(per_second * self.rate_safety, 4)

    @property
    def late_send_seconds(self) -> float | None:
        """How long after its rate slot a request may still leave (None: no margin to keep).

        Slots come `1 / (rate x rate_safety)` apart, so requests that all leave within `m`
        seconds of their slots reach the provider at most its count in any second while
        `m < 1 / rate_safety - 1` (0.11 s at 0.9). Half of that is ours; the other half is left
        to the way there (network, the provider's own queue)."""
        return (1 / self.rate_safety - 1) / 2 if self.rate_safety < 1 else None


def load_limits(path: Path = LIMITS_FILE) -> LimitsFile:
    """`path`, with the providers and accounts of every installed provider package's
    `limits.yaml` (entry point group `imagegen.limits`) added."""
    limits = LimitsFile.model_validate(yaml.safe_load(path.read_text()))
    for point in entry_points(group=GROUP):
        more = LimitsFile.model_validate(yaml.safe_load((resources.files(point.value) / "limits.yaml").read_text()))
        limits.providers.update(more.providers)
        for provider, blocks in more.accounts.items():
            limits.accounts[provider] = sorted({*limits.accounts.get(provider, []), *blocks})
    return limits


def rate_name(provider: str, block: str, action: str) -> str:
    return f"imagegen:{provider}:{block}:rate:{action}"


def jobs_name(provider: str, block: str, action: str) -> str:
    return f"imagegen:{provider}:{block}:jobs:{action}"


def wanted_limits(limits: LimitsFile, accounts: dict[str, list[str]] | None = None) -> dict[str, tuple[int, float | None]]:
    """Every limit name with (limit, slot decay per second or None)."""
    out: dict[str, tuple[int, float | None]] = {}
    for provider, blocks in (accounts or limits.accounts).items():
        declared = limits.providers.get(provider, ProviderLimits())
        for block in blocks:
            for action, per_second in declared.rate.items():
                out[rate_name(provider, block, action)] = (1, limits.applied_rate(per_second))
            for action, cap in declared.jobs.items():
                out[jobs_name(provider, block, action)] = (cap, None)
    return out
