"""The code of another commit, measured beside this one: ``--baseline GIT_REF``.

The tree of ``GIT_REF`` is exported (``git archive``: the repository and its worktrees are
left alone) into a temporary directory, which gets a virtualenv of its own from its own
lock file (its ``deploy/local/install.sh``). Its workers run from there, on the same
brokers, DPS emulator and configuration as this checkout's, given only the ``PIPELINE_*``
variables its configuration knows. :func:`sustained` then measures the end-to-end
sustained rate of both, in interleaved rounds, each on topics and sessions of its own
(it also compares two Mosquittos: :class:`Variant`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from benchmarks import procs, workload
from benchmarks.measure import output_rate

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from benchmarks.context import Context
    from pipeline.config import MqttConfig

__all__ = ["Baseline", "Variant", "checkout", "sustained"]

ROOT = Path(__file__).resolve().parents[1]
"""This checkout."""

_KNOWN_KEYS = """
import json, msgspec
from pipeline.config import Config
def walk(value, path):
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield from walk(getattr(value, name), [*path, name])
    else:
        yield "PIPELINE_" + "__".join(part.upper() for part in path)
print(json.dumps(sorted(walk(Config(), []))))
"""
"""Run by the baseline's interpreter: the environment variables its configuration reads."""


@dataclasses.dataclass(frozen=True)
class Baseline:
    """An exported commit with its own virtualenv."""

    ref: str
    commit: str
    root: Path
    known: frozenset[str]
    """The ``PIPELINE_*`` variables its configuration has a key for."""

    @property
    def python(self) -> Path:
        """Its interpreter (``<root>/.venv/bin/python``)."""
        return self.root / ".venv" / "bin" / "python"

    def environ(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` without the ``PIPELINE_*`` variables the baseline has no key for."""
        return {k: v for k, v in env.items() if not k.startswith("PIPELINE_") or k in self.known}


def _git(*args: str) -> str:
    done = subprocess.run(  # noqa: S603  (git, with our own arguments)
        ["git", "-C", str(ROOT), *args],  # noqa: S607
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def _export(commit: str, into: Path) -> None:
    archive = subprocess.Popen(  # noqa: S603
        ["git", "-C", str(ROOT), "archive", commit],  # noqa: S607
        stdout=subprocess.PIPE,
    )
    subprocess.run(  # noqa: S603
        ["tar", "-x", "-C", str(into)],  # noqa: S607
        stdin=archive.stdout,
        check=True,
    )
    if archive.wait() != 0:
        msg = f"git archive {commit} failed"
        raise procs.BenchError(msg)


@contextlib.asynccontextmanager
async def checkout(ref: str) -> AsyncIterator[Baseline]:
    """``ref`` exported and installed in a temporary directory, removed afterwards.

    Raises:
        BenchError: ``ref`` is not a commit, or its install failed.
    """
    try:
        commit = await asyncio.to_thread(_git, "rev-parse", "--verify", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError as exc:
        msg = f"--baseline {ref}: not a commit of this repository ({exc.stderr.strip()})"
        raise procs.BenchError(msg) from None
    root = Path(tempfile.mkdtemp(prefix="pipeline-baseline-"))
    try:
        await asyncio.to_thread(_export, commit, root)
        install = await asyncio.create_subprocess_exec(
            str(root / "deploy" / "local" / "install.sh"),
            cwd=root,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await install.communicate()
        if install.returncode != 0:
            msg = f"--baseline {ref}: its install.sh failed: {out.decode()[-500:]}"
            raise procs.BenchError(msg)
        probe = await asyncio.create_subprocess_exec(
            str(root / ".venv" / "bin" / "python"),
            "-c",
            _KNOWN_KEYS,
            cwd=root,
            stdout=asyncio.subprocess.PIPE,
        )
        keys, _ = await probe.communicate()
        if probe.returncode != 0:
            msg = f"--baseline {ref}: cannot read its configuration keys"
            raise procs.BenchError(msg)
        yield Baseline(ref, commit, root, frozenset(json.loads(keys)))
    finally:
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One side of a sustained-rate comparison: whose code runs, on which Mosquitto."""

    code: Baseline | None = None
    """An exported commit's code; None: this checkout's."""
    mqtt: MqttConfig | None = None
    """Another Mosquitto (host, port, credentials); None: the run's."""

    def describe(self) -> str:
        """Whose code, for a line of progress."""
        return "this checkout" if self.code is None else self.code.ref


async def sustained(
    ctx: Context, variants: dict[str, Variant], say: Callable[[str], None], *, tag: str
) -> dict[str, list[float]]:
    """The sustained rate (msg/s) of each variant, interleaved over rounds.

    Each measurement starts its three workers on topics and an MQTT session of its own
    (names from ``tag``, the round and the variant), warms them up, and drains the
    same-sized backlog as :func:`.latency.end_to_end`.
    """
    from benchmarks.latency import WARMUP, Pipeline  # noqa: PLC0415  (latency imports this)
    from benchmarks.stages import rotated  # noqa: PLC0415

    o = ctx.options
    out: dict[str, list[float]] = {who: [] for who in variants}
    index = {who: i for i, who in enumerate(variants)}
    for r in range(o.rounds):
        for who in rotated(list(variants), r):
            variant, name = variants[who], f"{tag}{r}{index[who]}"
            cfg = ctx.config(name)
            if variant.mqtt is not None:
                cfg = msgspec.structs.replace(cfg, mqtt=_moved(cfg.mqtt, variant.mqtt))
            await ctx.topics_for(cfg, *cfg.kafka.topics.__struct_fields__)
            await ctx.session_for(cfg)
            workers: dict[str, procs.Proc] = {}
            try:
                for command in ("ingest", "route", "sink"):
                    workers[command] = await ctx.worker(
                        command, cfg, f"{name}-{command}", baseline=variant.code
                    )
                pipe = Pipeline(ctx, cfg, workers)
                await pipe.through(WARMUP, "w", None, o.limit)
                backlog = await pipe.through(o.sustain, "s", None, o.limit)
            finally:
                for proc in workers.values():
                    await proc.stop()
            value = output_rate(backlog.records) / workload.CHILDREN
            out[who].append(value)
            say(f"  {who} ({variant.describe()}): {value:,.0f} msg/s")
    return out


def _moved(mqtt: MqttConfig, to: MqttConfig) -> MqttConfig:
    """``mqtt`` (a measurement's names) on the broker of ``to``."""
    return msgspec.structs.replace(
        mqtt, host=to.host, port=to.port, username=to.username, password=to.password,
        tls=to.tls, iotda=to.iotda,
    )  # fmt: skip
