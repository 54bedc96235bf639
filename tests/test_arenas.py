"""A flow's process shares two malloc arenas among its threads (`flows.arenas`): counted by
glibc itself (`malloc_info`), in a fresh interpreter whose threads each allocate."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COUNT_HEAPS = r"""
import ctypes, os, re, sys, tempfile, threading
if sys.argv[1] == "flows":
    import flows  # noqa: F401 - what is measured: its import
held, ready = [], threading.Barrier(9)
def work():
    held.append(bytearray(50_000))  # below the mmap threshold: from the thread's arena
    ready.wait()
    ready.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
ready.wait()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = os.path.join(tempfile.mkdtemp(), "malloc.xml")
out = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, out)
libc.fclose(out)
ready.wait()
print(len(re.findall(r"<heap nr=", open(path).read())))
"""


def _heaps(what: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", COUNT_HEAPS, what], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="malloc arenas are glibc's")
def test_importing_flows_caps_the_arenas_threads_get() -> None:
    assert _heaps("flows") <= 2
    assert _heaps("plain") > 2  # without it, the threads got arenas of their own (what is capped)


HOLES = r"""
import flows
from flows.arenas import trim_now_and_then
def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
held = [bytearray(100_000) for _ in range(2000)]  # 200 MB below the mmap threshold: from the heap
del held[::2]  # half of it freed in holes between live blocks, as ended items leave it
before = rss()
print(trim_now_and_then(every=0), trim_now_and_then(every=3600), before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="malloc_trim is glibc's")
def test_freed_holes_in_the_heap_go_back_to_the_system_at_most_every_so_often() -> None:
    done = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=120, check=True)
    trimmed, again, before, after = done.stdout.split()
    assert (trimmed, again) == ("True", "False")  # the second, within the interval, does nothing
    assert int(before) - int(after) > 80_000  # kB: most of the 100 MB of holes went back
