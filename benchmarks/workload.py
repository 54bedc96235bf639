"""The benchmark workload: N text-to-image items spread over the providers, and the
analytic ceiling no client can beat on it.

A job on a provider uses `1 + p` requests (submit and `p` polls) and holds one in-flight slot
for the job's latency `L`. With a rate of `R` requests a second for an action, N jobs need at
least `N * requests / R` seconds; with `C` jobs in flight, at least `N * L / C`. Each provider's
bound is the larger of the two, from the *published* limits in `deployments/limits.yaml` (not
the safety-reduced ones the flow applies), and the providers run side by side, so the
workload's ceiling is the largest provider bound. Items are split so that every provider's
bound is about the same, and interleaved so each provider is busy from the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from blocks import registry
from blocks.base import ImageProvider
from flows.paying.limits import LimitsFile, load_limits
from flows.paying.slots import PrefectLimiter
from sandbox.accounts import emulators

def _providers() -> dict[str, type[ImageProvider]]:
    """The registered providers that have an emulator to run against."""
    return {name: cls for name, cls in registry.providers().items() if name in emulators()}


PROVIDER_CLASSES = _providers()
PROVIDERS = tuple(PROVIDER_CLASSES)
# The actions one text-to-image job's requests count against, as each Block names them to its
# limiter (a submit, then polls), and the action its in-flight slot is held for.
ACTIONS = {name: cls.text_job_actions() for name, cls in PROVIDER_CLASSES.items()}
SUBMIT_ACTION = {name: actions[0] for name, actions in ACTIONS.items()}
POLL_ACTION = {name: actions[1] for name, actions in ACTIONS.items()}
JOB_ACTION = {name: actions[2] for name, actions in ACTIONS.items()}


def polls_needed(latency: float, poll_interval: float) -> int:
    """Polls a client polling every `poll_interval` seconds after submit makes before it sees
    a job of `latency` seconds finished."""
    return max(1, math.ceil(latency / poll_interval - 1e-9))


def seconds_per_job(provider: str, latency: float, polls: float, limits: LimitsFile) -> float:
    """Seconds of the provider's published capacity one job uses: the tighter of its rate and
    in-flight bounds."""
    limiter = PrefectLimiter(provider, "published", limits)  # which action counts against which limit
    requests: dict[str, float] = {}
    for action, count in ((SUBMIT_ACTION[provider], 1.0), (POLL_ACTION[provider], polls)):
        key = limiter.rate_action(action)
        if key is not None:
            requests[key] = requests.get(key, 0.0) + count
    rate_bound = max((n / limiter.declared.rate[a] for a, n in requests.items()), default=0.0)
    cap = limiter.job_cap(JOB_ACTION[provider])
    return max(rate_bound, latency / cap[1] if cap else 0.0)


@dataclass(frozen=True)
class Workload:
    """How many items each provider gets, and the bounds that follow."""

    items: int
    latency: float
    poll_interval: float
    split: dict[str, int]
    per_job: dict[str, float]
    limits: LimitsFile = field(repr=False, compare=False)
    polls: float = 1.0
    """Polls a job needs at best in the mode measured (0 where a callback ends the job)."""

    @classmethod
    def build(cls, items: int, latency: float, poll_interval: float, limits: LimitsFile | None = None, *,
              providers: tuple[str, ...] = PROVIDERS, polls: float | None = None) -> Workload:
        """`items` over `providers` so each one's bound is about the same; `polls` a job (by
        default what polling every `poll_interval` needs)."""
        limits = limits or load_limits()
        polls = polls_needed(latency, poll_interval) if polls is None else polls
        per_job = {p: seconds_per_job(p, latency, polls, limits) for p in PROVIDERS}
        weights = {p: 1.0 / per_job[p] if p in providers else 0.0 for p in PROVIDERS}
        total = sum(weights.values())
        split = {p: int(items * weights[p] / total) for p in PROVIDERS}
        for p in sorted(providers, key=lambda p: -weights[p])[: items - sum(split.values())]:
            split[p] += 1  # the remainder goes to the providers with the most capacity
        return cls(items, latency, poll_interval, split, per_job, limits, polls)

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(p for p in PROVIDERS if self.split[p])

    def ceiling(self, polls: dict[str, float] | None = None) -> dict[str, float]:
        """Seconds each provider needs at best, and `overall` (they run side by side). With
        `polls` (measured polls per job), the rate bound uses those instead of the minimum."""
        out = {}
        for p in self.providers:
            per_job = self.per_job[p] if polls is None or p not in polls else \
                seconds_per_job(p, self.latency, polls[p], self.limits)
            out[p] = round(self.split[p] * per_job, 3)
        out["overall"] = max(out[p] for p in self.providers)
        return out

    def order(self) -> list[str]:
        """The provider of each item, interleaved in proportion to the split."""
        slots = sorted(((k + 0.5) / n, p) for p, n in self.split.items() for k in range(n))
        return [p for _, p in slots]

    def write_spec(self, path: Path, name: str, bucket: str, block: str, max_parallel: int,
                   moderation: bool = True, credentials: str | None = None) -> Path:
        """A pipeline spec of this workload: generate, review (checks and moderation), archive."""
        review: dict = {"min_stddev": 3.0, "check_size": True}
        if moderation:
            review["moderation"] = {"threshold": 0.8}
        spec = {
            "version": 1, "name": name, "provider": self.providers[0], "blocks": {p: block for p in self.providers},
            "generate": {"width": 512, "height": 512, "steps": 20,
                         "provider_options": {p: dict(cls.sample_options) for p, cls in PROVIDER_CLASSES.items()
                                              if cls.sample_options}},
            "review": review,
            "archive": {"bucket": bucket, "credentials": credentials or block},
            "run": {"max_parallel": max_parallel, "poll_interval": self.poll_interval, "job_timeout": 600,
                    "http_timeout": 30},
            "items": [{"id": f"item-{n:04d}", "prompt": f"product shot {n}, studio light", "seed": 1000 + n,
                       "provider": provider} for n, provider in enumerate(self.order())],
        }
        path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        return path
