"""``python -m benchmarks --profile DIR``: where each worker spends its CPU under the bench load.

After the measured rounds, one more round runs each stage worker with py-spy attached
from its first output record on (``py-spy record --pid``; sampling pauses the process,
so this round's figures are not kept). The raw collapsed stacks go to
``DIR/<stage>.txt`` (feed them to any flame graph tool); the bench prints, per stage,
the functions with the largest share of samples, by own time and including callees
(the interpreter's and the event loop's frames, on every stack, left out). Idle time
(waiting in the event loop's ``select``) is not sampled, so shares are of the time the
worker was busy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PY_SPY", "Recording", "available", "summarize"]

PY_SPY = "py-spy"
_RATE = 500
_LINE = re.compile(r" \(([^:()]*):\d+\)$")
_TRUNK = ("<frozen", "asyncio/", "runpy", "pipeline/__main__.py", "pipeline/cli.py")
"""Frames on every stack (the interpreter's and the event loop's): left out of "inclusive"."""
_IDLE = frozenset({"_worker (concurrent/futures/thread.py)"})
"""Leaf frames py-spy samples as busy that are waiting: a thread pool's idle worker."""


def available() -> bool:
    """Whether py-spy is on the PATH (``pip install py-spy``)."""
    return shutil.which(PY_SPY) is not None


def _function(frame: str) -> str:
    """``name (path/file.py:123)`` without the line: one entry per function."""
    return _LINE.sub(r" (\1)", frame)


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    """Shares of samples per function in a py-spy raw file: own time and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        if frames[-1] in _IDLE:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = (lambda n: n / total) if total else (lambda _: 0.0)
    return {
        "samples": total,
        "own": [[f, share(n)] for f, n in own.most_common(top)],
        "inclusive": [
            [f, share(n)]
            for f, n in inclusive.most_common()
            if not any(t in f for t in _TRUNK) and f != "<module> (<string>)"
        ][:top],
    }


class Recording:
    """py-spy attached to one process until :meth:`stop`."""

    def __init__(self, process: asyncio.subprocess.Process, path: Path) -> None:
        self._process = process
        self.path = path

    @classmethod
    async def attach(cls, pid: int, path: Path) -> Recording:
        """Start sampling ``pid`` into ``path`` (raw collapsed stacks)."""
        process = await asyncio.create_subprocess_exec(
            PY_SPY, "record", "--pid", str(pid), "--rate", str(_RATE), "--format", "raw",
            "--output", str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return cls(process, path)

    async def stop(self) -> None:
        """Stop sampling (SIGINT: py-spy writes its file and exits)."""
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
