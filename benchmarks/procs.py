"""The processes the bench measures: workers, ceilings and the DPS emulator, one each.

Each stage runs as its own ``pipeline ingest|route|sink`` process, exactly as deployed,
so its peak resident memory is its own (``VmHWM`` in ``/proc/<pid>/status``). Each
ceiling runs as its own ``python -m benchmarks.ceilings`` process, so a
stage and its ceiling compete for the same two cores in the same way. The DPS emulator
serves from a third process, never from the measured one.

Configuration reaches a child as the user's ``--config`` file plus
``PIPELINE_<SECTION>__<KEY>`` overrides for what the bench makes unique to a
measurement (topics, client id, groups, the emulator's URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import to_environ
from pipeline.errors import PipelineError
from pipeline.tools.services import free_port

if TYPE_CHECKING:
    from pipeline.config import Config

__all__ = ["BenchError", "Memory", "Proc", "child_env", "free_port", "start"]

_STOP_TIMEOUT = 30.0
_TAIL = 2000


class BenchError(PipelineError):
    """A measurement could not be made (a process died, a count was never reached)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Memory:
    """A process's resident memory in MB (10^6 bytes): its peak so far and now."""

    peak_mb: float
    now_mb: float


def child_env(cfg: Config) -> dict[str, str]:
    """The environment that gives a child process the measurement's configuration ``cfg``."""
    return os.environ | to_environ(cfg) | {"PIPELINE_METRICS__ENABLED": "false"}


class Proc:
    """A child process of the bench, its log file, and a reading of its memory."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def memory(self) -> Memory:
        """Peak (``VmHWM``) and current (``VmRSS``) resident memory, from ``/proc``."""
        fields: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024 / 1e6  # kB there are KiB
        if len(fields) != 2:  # noqa: PLR2004
            self.check()
            msg = f"{self.name}: cannot read /proc/{self.pid}/status (not Linux?)"
            raise BenchError(msg)
        return Memory(fields["VmHWM"], fields["VmRSS"])

    def cpu_seconds(self) -> float:
        """CPU time the process has used so far (user + system), from ``/proc``."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            self.check()
            raise
        # After the command name: state is field 3, utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self) -> str:
        """The end of what the process wrote to stderr."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-_TAIL:].strip()
        return ""

    def check(self) -> None:
        """Raise :class:`BenchError` if the process has exited (a worker never should)."""
        if self.process.returncode is not None:
            msg = f"{self.name} exited with code {self.process.returncode}: {self.tail()}"
            raise BenchError(msg)

    def check_failed(self) -> None:
        """Raise :class:`BenchError` if the process has failed (a ceiling ends with 0)."""
        if self.process.returncode not in (None, 0):
            self.check()

    async def result(self, limit: float) -> dict[str, Any]:
        """Wait for a ceiling to finish; its one JSON line on stdout."""
        try:
            async with asyncio.timeout(limit):
                out, _ = await self.process.communicate()
        except TimeoutError:
            await self.stop()
            msg = f"{self.name} did not finish within {limit:g} s: {self.tail()}"
            raise BenchError(msg) from None
        if self.process.returncode != 0:
            msg = f"{self.name} exited with code {self.process.returncode}: {self.tail()}"
            raise BenchError(msg)
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    async def stop(self) -> int:
        """SIGTERM (the workers' orderly shutdown), SIGKILL if it does not end in time."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(_STOP_TIMEOUT):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode if self.process.returncode is not None else -1


async def start(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    log_dir: Path,
    config_path: str | None,
    capture: bool = False,
    python: Path | None = None,
) -> Proc:
    """Start ``python -m <argv...>``; stderr goes to ``log_dir/<name>.log``.

    ``argv`` starts with the module (``pipeline`` or ``benchmarks.ceilings``);
    ``--config`` is inserted after it when the bench itself was given one. ``python``:
    another checkout's interpreter (:mod:`.baseline`), run from that checkout's root.
    """
    module, *rest = argv
    config = ["--config", config_path] if config_path else []
    log = log_dir / f"{name}.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            str(python) if python is not None else sys.executable,
            "-m",
            module,
            *config,
            *rest,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL,
            stderr=stderr,
            cwd=python.parents[2] if python is not None else None,  # <root>/.venv/bin/python
        )
    return Proc(name, process, log)
