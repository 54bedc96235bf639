"""Fewer malloc arenas in a flow's process, and their free pages given back as a run goes on.

glibc gives a thread that allocates its own malloc arena, up to eight per core, and memory
freed in one arena is not reused by another. A run's task runner keeps `run.max_parallel`
threads (64 by default), so a run held 16 arenas on two cores, each with its own fragmented
free memory: peak RSS was 396 MB against 327 MB with two arenas (300 items, same tree, `make
bench`'s flow run; the single-threaded baseline script peaks at 309 MB). The Python threads
take turns on the GIL anyway, so sharing two arenas costs them nothing measurable.

Set once, on import of `flows`, before a run starts its threads. A `MALLOC_ARENA_MAX` in the
environment is the user's and is left alone (glibc has applied it already); where the C
library is not glibc (no `mallopt`, as on musl or macOS) nothing happens.

`trim_now_and_then` (the submitting loop calls it as items end) hands the free pages inside the
heaps back with `malloc_trim`, at most every `TRIM_EVERY` s: without it a flow's RSS grew with
the run's length (328 MB at the start of a 5,000-item run, 376 MB after 30 minutes); with it a
1,000-item run stayed at 274-307 MB throughout. `IMAGEGEN_MALLOC_TRIM=0` turns it off.

`fix_mmap_threshold` (on import of `flows`, with the arenas) keeps every block of 128 KiB and more
in a mapping of its own, given back to the system as it is freed. glibc starts so, but raises
the threshold to the size of each such block freed (up to 32 MiB): from then on a run's large
transient buffers (a manifest's JSON, an artifact's request and answer, decoded images) come
from the heap and leave their room resident there. The end of a 5,000-item run alone
(`benchmarks/endpeak.py`) peaked 4.6 MiB lower with it.

`restart_without_thread_caches` (`imagegen run` and `backfill` call it first) starts the process
again, same pid and command line, with glibc's per-thread caches of freed blocks off. Each
thread keeps up to seven freed blocks of every small size for itself, which no other thread
reuses, no trim gives back and glibc counts as in use: with 64 task threads that filled for the
whole run, a 2,000-item run's C heap in use rose 12 MB in ten minutes (RSS 185 to 199 MB);
without the caches it stayed within 1 MB (RSS 180 to 184 MB), at the same CPU an image. It can
only be set when a process starts (`GLIBC_TUNABLES`); a value of the user's is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

M_ARENA_MAX = -8  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value
TUNABLES = "GLIBC_TUNABLES"
ARENAS = 2
TRIM_EVERY = 30.0  # seconds between two `trim_now_and_then` that trim
_trimmed_at = [0.0]


def glibc_function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Any:
    """The C library's function `name` (returning `restype`), or None where it has none (not
    Linux, not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap the process's malloc arenas at `arenas`; True when the C library took it."""
    if os.environ.get("MALLOC_ARENA_MAX") or (mallopt := glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])) is None:
        return False
    return mallopt(M_ARENA_MAX, arenas) == 1


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Keep blocks of `threshold` bytes and more in mappings of their own, for good (a threshold
    set by `mallopt` is not raised again); True when the C library took it. A threshold of the
    user's (`GLIBC_TUNABLES` or `MALLOC_MMAP_THRESHOLD_`) is left alone."""
    if "mmap_threshold" in os.environ.get(TUNABLES, "") or os.environ.get("MALLOC_MMAP_THRESHOLD_") \
            or (mallopt := glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])) is None:
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def trim_now_and_then(every: float = TRIM_EVERY) -> bool:
    """Give the free pages inside the C allocator's heaps back to the system (glibc's
    `malloc_trim`), at most once every `every` seconds; True when it ran and released some.
    Images and HTTP bodies of ended items leave freed holes among live objects, which the heap
    keeps resident otherwise."""
    now = time.monotonic()
    if os.environ.get("IMAGEGEN_MALLOC_TRIM") == "0" or now - _trimmed_at[0] < every:
        return False
    _trimmed_at[0] = now
    malloc_trim = glibc_function("malloc_trim", [ctypes.c_size_t])
    return malloc_trim is not None and malloc_trim(0) == 1


NO_THREAD_CACHES = "glibc.malloc.tcache_count=0"


def without_thread_caches(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with glibc's per-thread caches off, or None where it needs no change: not
    glibc, or `GLIBC_TUNABLES` already set (the user's, or this already applied)."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        libc = ""
    if not libc.startswith("glibc") or environ.get(TUNABLES) is not None:
        return None
    return {**environ, TUNABLES: NO_THREAD_CACHES}


def restart_without_thread_caches() -> None:
    """Execute this process's own command line again (same pid, same arguments) with glibc's
    per-thread caches off; returns only where nothing changes or the restart is refused."""
    environ = without_thread_caches(os.environ)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError:
        return  # the run goes on with the caches: more memory, nothing else
