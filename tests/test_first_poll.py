"""The first-poll wait where status requests are scarce (blocks/first_poll.py): learned from
the jobs seen end, never below one interval, probed every `PROBE_EVERY` jobs, forgetting old jobs."""

from __future__ import annotations

from blocks.chuzhan import ChuzhanProvider
from blocks.first_poll import PROBE_EVERY, REMEMBERED, FirstPoll
from blocks.tams import TamsProvider
from blocks.tencent import TencentAiArtProvider


def test_the_first_job_is_polled_after_one_interval_and_the_next_after_the_shortest_seen() -> None:
    timer = FirstPoll()
    assert timer.wait(1.0) == 1.0
    timer.ended(2.4)
    timer.ended(2.1)
    assert timer.wait(1.0) == 2.1


def test_it_never_waits_less_than_one_interval() -> None:
    timer = FirstPoll()
    timer.wait(1.0)
    timer.ended(0.3)
    assert timer.wait(1.0) == 1.0


def test_one_job_in_probe_every_is_polled_after_one_interval_so_shorter_jobs_are_learned() -> None:
    timer = FirstPoll()
    waits = []
    for _ in range(2 * PROBE_EVERY):
        waits.append(timer.wait(1.0))
        timer.ended(3.0)
    assert waits.count(1.0) == 2 and waits[0] == waits[PROBE_EVERY] == 1.0
    timer.ended(1.5)  # a probe found a shorter job
    assert [timer.wait(1.0), timer.wait(1.0)] == [1.0, 1.5]  # the next probe, then the learned wait


def test_only_the_last_remembered_jobs_count() -> None:
    timer = FirstPoll()
    timer.wait(1.0)
    timer.ended(1.2)
    for _ in range(REMEMBERED):
        timer.ended(5.0)
    assert timer.wait(1.0) == 5.0


def test_only_providers_whose_status_requests_spend_a_binding_rate_learn() -> None:
    """TAMS: one rate for every call. 触站AI: one status-request rate for all tasks. Tencent: 20
    status requests a second per action, which its one job in flight never nears."""
    for cls, scarce in ((TamsProvider, True), (ChuzhanProvider, True), (TencentAiArtProvider, False)):
        assert cls.polls_are_scarce.fget(None) is scarce, cls  # type: ignore[attr-defined]
