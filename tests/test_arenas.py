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


def _counted(script: str, what: str, unset: tuple[str, ...]) -> int:
    """The number `script` prints in a fresh interpreter (`what`: "flows" imports flows first),
    without the environment variables `unset` (a user's malloc settings would change it)."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run([sys.executable, "-c", script, what], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    return int(done.stdout.strip())


def _heaps(what: str) -> int:
    return _counted(COUNT_HEAPS, what, ("MALLOC_ARENA_MAX",))


GLIBC = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
GLIBC_ONLY = pytest.mark.skipif(not GLIBC, reason="malloc's settings are glibc's")


@GLIBC_ONLY
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


@GLIBC_ONLY
def test_freed_holes_in_the_heap_go_back_to_the_system_at_most_every_so_often() -> None:
    done = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=120, check=True)
    trimmed, again, before, after = done.stdout.split()
    assert (trimmed, again) == ("True", "False")  # the second, within the interval, does nothing
    assert int(before) - int(after) > 80_000  # kB: most of the 100 MB of holes went back


THREAD_CACHES = r"""
import ctypes, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
done, stay = threading.Barrier(33), threading.Event()
def work():  # seven blocks of every small size, all freed: as a task thread leaves them
    blocks = [libc.malloc(size) for size in range(16, 1040, 16) for _ in range(7)]
    for block in blocks:
        libc.free(block)
    done.wait()
    stay.wait()  # the thread lives on, as a task runner's does
threads = [threading.Thread(target=work) for _ in range(32)]
before = libc.mallinfo2().uordblks
for t in threads:
    t.start()
done.wait()
print((libc.mallinfo2().uordblks - before) // 1024)
stay.set()
"""


def _kept_by_threads(environ: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", THREAD_CACHES], capture_output=True, text=True, timeout=120,
                          check=True, env=environ)
    return int(done.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="the thread caches are glibc's")
def test_without_thread_caches_memory_freed_by_threads_is_not_kept_as_in_use() -> None:
    from flows.arenas import without_thread_caches

    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ = without_thread_caches(plain)
    assert environ is not None and without_thread_caches({**plain, "GLIBC_TUNABLES": "x"}) is None
    assert _kept_by_threads(plain) > 3_000  # KiB: 32 threads' caches, counted by glibc as in use
    assert _kept_by_threads(environ) < 1_000


RESTART = r"""
import os, sys
sys.argv = ["imagegen", *sys.argv[1:]]
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
from flows.cli import console
console()
"""


@pytest.mark.skipif(not GLIBC, reason="the thread caches are glibc's")
@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_run_starts_again_without_thread_caches_and_other_commands_do_not(command: str) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", RESTART, command, "--help"], capture_output=True, text=True,
                          timeout=120, env=environ)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and "usage: imagegen" in done.stdout, done.stdout + done.stderr
    if command == "run":  # the same process (pid) with the same arguments, started again once
        (pid, first), (again, second) = lines[0].split(), lines[1].split()
        assert (first, second, again) == ("None", "glibc.malloc.tcache_count=0", pid)
        assert not lines[2].split()[0].isdigit()
    else:
        assert lines[0].split()[1] == "None" and not lines[1].split()[0].isdigit()


MAPPED = r"""
import ctypes, sys
if sys.argv[1] == "flows":
    import flows  # noqa: F401 - what is measured: its import

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
big = bytearray(8 << 20)  # mapped, as any block past the threshold
del big  # glibc then raises its threshold past 8 MiB, unless it was fixed
before = mallinfo2().hblks
block = bytearray(1 << 20)
print(mallinfo2().hblks - before)
"""


def _mapped(what: str) -> int:
    return _counted(MAPPED, what, ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_"))


@GLIBC_ONLY
def test_importing_flows_keeps_large_blocks_mapped_after_a_larger_one_is_freed() -> None:
    """A 1 MiB block after an 8 MiB one was freed: in a mapping of its own (given back as it is
    freed) with `flows` imported; from the heap without it (what `fix_mmap_threshold` stops)."""
    assert _mapped("flows") == 1
    assert _mapped("plain") == 0
