"""Fewer malloc arenas in a flow's process.

glibc gives a thread that allocates its own malloc arena, up to eight per core, and memory
freed in one arena is not reused by another. A run's task runner keeps `run.max_parallel`
threads (64 by default), so a run held 16 arenas on two cores, each with its own fragmented
free memory: peak RSS was 396 MB against 327 MB with two arenas (300 items, same tree, `make
bench`'s flow run; the single-threaded baseline script peaks at 309 MB). The Python threads
take turns on the GIL anyway, so sharing two arenas costs them nothing measurable.

Set once, on import of `flows`, before a run starts its threads. A `MALLOC_ARENA_MAX` in the
environment is the user's and is left alone (glibc has applied it already); where the C
library is not glibc (no `mallopt`, as on musl or macOS) nothing happens.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's <malloc.h>
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap the process's malloc arenas at `arenas`; True when the C library took it."""
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1
