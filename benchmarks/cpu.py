"""Where a benchmark process spends its CPU: py-spy samples the thread holding the GIL (`--gil`),
and each sample goes to the part of the work its stack is in, decided by the innermost frame of
this project's code. Sampling "running" threads instead counted threads waiting on a socket, a
queue or a lock (py-spy cannot tell them apart without pausing the process): a third of the
samples. Work outside the GIL (the moderation model's inference, image decoding) is undercounted
here; the total CPU per image comes from the process's own rusage, not from these shares.

- limits: `flows/paying/slots.py`, `flows/paying/slotapi.py` (slot calls to the Prefect server)
- ledger: `flows/paying/ledger.py`, `flows/paying/claim.py`, `flows/paying/callbacks.py` (its S3 reads and writes)
- review: `flows/imaging/review.py`, `flows/imaging/images.py` (moderation model, image checks)
- archive (S3): S3 work (`flows/storage.py`, the S3 client) under any project frame but the
  ledger's and the limits'; `flows/storage.py` itself is no part: its caller's decides
- provider HTTP: the Blocks (`blocks/`), signing and downloads included
- Prefect: Prefect's own frames with no project frame inside them (task runs, states, events,
  logs, the engine), or under the flow's orchestration (`flows/pipeline.py`, `flows/running/tasks.py`)
- other: the rest (the flow's own Python, the interpreter, libraries)

Without py-spy (the `bench` extra) the breakdown is left out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 29  # samples a second: one thread each (the GIL holder), so the measured run pays little
RULES = (
    ("flows/paying/slots.py", "limits"), ("flows/paying/slotapi.py", "limits"),
    ("flows/paying/ledger.py", "ledger"), ("flows/paying/claim.py", "ledger"),
    ("flows/paying/callbacks.py", "ledger"), ("flows/imaging/review.py", "review"), ("flows/imaging/images.py", "review"),
    ("blocks/", "provider HTTP"),
)
ORCHESTRATION = ("benchmarks/baseline.py", "flows/pipeline.py", "flows/running/tasks.py", "flows/running/progress.py", "flows/running/report.py", "flows/paying/wakeup.py")
S3_WORK = ("flows/storage.py", "botocore/", "boto3/", "s3transfer/", "prefect_aws/")


def _binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Sampler:
    """py-spy recording this process until `stop()`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        binary = _binary()
        self.proc = None if binary is None else subprocess.Popen(
            [binary, "record", "--pid", str(os.getpid()), "--rate", str(RATE), "--format", "raw", "--nonblocking",
             "--gil", "--threads", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, float] | None:
        """Stop sampling; the share of samples in each part (None without py-spy or samples)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        return breakdown(self.out.read_text()) if self.out.exists() else None


def filename(frame: str) -> str:
    """The file of a py-spy frame `func (path:line)`, as py-spy shortens it (relative to the
    `sys.path` entry it was imported from: `flows/paying/slots.py`, `prefect/engine.py`)."""
    inside = frame[frame.rfind("(") + 1:].rstrip(")")
    return inside.rpartition(":")[0] or inside


def category(stack: list[str]) -> str:
    """The part of the work a sampled stack (outermost frame first) is in."""
    files = [filename(f) for f in stack]
    for depth in range(len(files) - 1, -1, -1):
        here, inner = files[depth], files[depth + 1:]
        for prefix, name in RULES:
            if here.startswith(prefix):
                if name not in ("ledger", "limits") and any(f.startswith(S3_WORK) for f in inner):
                    return "archive (S3)"
                return name
        if here.startswith(ORCHESTRATION):
            if any(f.startswith(S3_WORK) for f in inner):
                return "archive (S3)"
            return "Prefect" if any(f.startswith("prefect/") for f in inner) else "other"
    return "Prefect" if any(f.startswith("prefect/") for f in files) else "other"


def breakdown(raw: str) -> dict[str, float] | None:
    """Shares of samples per part, from py-spy's raw (collapsed stacks) output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("thread ")]
        counts[category(frames)] += int(n)
    total = sum(counts.values())
    return {name: round(n / total, 3) for name, n in counts.most_common()} if total else None
