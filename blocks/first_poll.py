"""When to ask first about a job just submitted, where status requests are scarce.

A status request that finds a job still running is wasted, and where status requests spend a
rate that binds, it is a request another job needed: TAMS counts every call against one rate
(5 a second), polls included, so it is a submit not sent; 触站AI has one status-request rate for
all tasks (2 a second, assumed), which polling its two tasks in flight every second exceeds.
Where a Block says its polls are scarce (`ImageProvider.polls_are_scarce`), a job just submitted
is first polled after the shortest time this process has recently seen a job of that Block and
action take to end, never before one poll interval:

- one job in `PROBE_EVERY` (and the first) is polled after one interval as before, so jobs that
  become shorter are learned too; jobs that become longer are polled as before until they are
  the shortest remembered;
- only the last `REMEMBERED` jobs count, so a slow hour is forgotten;
- a job's time runs from its submit's answer to the status request that found it ended: the
  wait is what the quickest recent job took to be seen ended; less, where that request took ten
  intervals or more, what it took beyond one (its rate slot, on a Prefect server that stalled
  for a minute: each job then seemed to take a minute, and the jobs after it waited that long
  to be asked). A shorter wait, such as a provider's `Retry-After`, still counts.

A wait never changes what is paid or kept: only when the first status request is sent.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable

PROBE_EVERY = 8
REMEMBERED = 32


class FirstPoll:
    """The first-poll wait of one Block and action, learned from the jobs it saw end."""

    def __init__(self) -> None:
        self._seen: deque[float] = deque(maxlen=REMEMBERED)
        self._started = 0
        self._lock = threading.Lock()

    def wait(self, interval: float) -> float:
        """Seconds to wait before the first status request of a job submitted now."""
        with self._lock:
            self._started += 1
            if not self._seen or self._started % PROBE_EVERY == 1:
                return interval
            return max(interval, min(self._seen))

    def ended(self, seconds: float) -> None:
        """A job ended `seconds` after its submit was answered (as its status request found)."""
        with self._lock:
            self._seen.append(seconds)


_timers: dict[Hashable, FirstPoll] = {}
_timers_lock = threading.Lock()


def first_poll(key: Hashable) -> FirstPoll:
    """The process's `FirstPoll` for `key` (a Block's provider, endpoint and job action)."""
    with _timers_lock:
        return _timers.setdefault(key, FirstPoll())
