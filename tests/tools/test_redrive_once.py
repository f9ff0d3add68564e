"""Redrive of the allocations DLQ puts each record back once, whatever happens to the runs.

Each batch of a run and its offsets are one Kafka transaction; the transactional id is
the DLQ's, so a run fences the runs before it. Checked end to end: real ``pipeline
redrive`` processes, the real sink, the DPS emulator; each redriven child is allocated
exactly once (one allocate call, one allocation record).
"""

from __future__ import annotations

import asyncio
import collections
import re
import sys
from pathlib import Path

import msgspec
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import RunningEmulator, start_emulator
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.schemas import AllocationFailure
from pipeline.stages.sink import Sink
from pipeline.tools.redrive import redrive_group
from tests.harness import kill, read_topic, running, start, worker_env
from tests.stages.sink.support import GROUP, child, prepare, with_emulator

pytestmark = pytest.mark.services

_ROOT = Path(__file__).parents[2]


async def _dead_letter(cfg: Config, sns: list[str]) -> None:
    """As if DPS had refused each sn (35404, the group missing): one DLQ record each."""
    encode = msgspec.json.Encoder().encode
    async with kafka.producer(cfg.kafka) as producer:
        sends = []
        for sn in sns:
            failure = AllocationFailure(
                sn=sn, org_id=cfg.sink.org_id, device_id=f"prod_{sn}", gateway_id="gw-e2e",
                event_id="ev-1", attempts=1, error_kind="rejected", code=35404,
                msg="Group/Device group not found", request_id="r-1", failed_at="x",
                http_status=200, record=msgspec.Raw(child(sn)),
            )  # fmt: skip
            sends.append(
                await producer.send(
                    cfg.kafka.topics.allocations_dlq, encode(failure), key=sn.encode()
                )
            )
        await asyncio.gather(*sends)


async def _redrive(cfg: Config, *args: str, paused: bool = False) -> asyncio.subprocess.Process:
    """``pipeline redrive allocations ARGS`` in a process of its own (see paused_redrive)."""
    module = "tests.tools.paused_redrive" if paused else "pipeline"
    pipe = asyncio.subprocess.PIPE
    return await start(
        sys.executable, "-m", module, "--log-level", "warning", "redrive", "allocations", *args,
        env=worker_env(cfg), cwd=_ROOT, stdin=pipe, stdout=pipe, stderr=pipe,
    )  # fmt: skip


async def _outcome(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


_FENCED = re.compile(
    r"pipeline: another `pipeline redrive allocations` took over \S+, fencing this run: "
    r"it moved (\d+) records \(committed\); the other run moves the rest\n"
)


def _moved(outcome: tuple[int, str, str]) -> int:
    """What a run moved: it finished (exit 0), or another took over (exit 1, fenced)."""
    code, out, err = outcome
    if code == 0:
        found = re.fullmatch(r"moved (\d+) records\n", out)
    else:
        assert code == 1, outcome
        found = _FENCED.fullmatch(err)
    assert found, outcome
    return int(found[1])


async def _committed(cfg: Config) -> int:
    """How many DLQ records the redrive group has committed past (the DLQ has no markers)."""
    async with kafka.admin(cfg.kafka) as admin:
        offsets = await admin.list_consumer_group_offsets(redrive_group(cfg, "allocations"))
    return sum(meta.offset for meta in offsets.values())


async def _records(cfg: Config, topic: str, *, isolation_level: str) -> int:
    async with kafka.reader(cfg.kafka, isolation_level=isolation_level) as reader:
        return len([r async for r in kafka.read_range(reader, await kafka.whole(reader, topic))])


async def _allocated_once(cfg: Config, emu: RunningEmulator, sns: list[str]) -> None:
    """The sink allocates each sn once: one allocate call, one allocation, one added record."""
    t = cfg.kafka.topics
    async with running(Sink(cfg), Health()):
        got = await read_topic(cfg.kafka, t.allocations, expect=len(sns), timeout=120)
        added = await read_topic(cfg.kafka, t.added, expect=len(sns))
    calls = [c.sn for c in emu.state.calls if c.action == "allocate"]
    assert collections.Counter(calls) == dict.fromkeys(sns, 1)
    assert collections.Counter(r.key for r in got) == dict.fromkeys((sn.encode() for sn in sns), 1)
    keys = collections.Counter(r.key for r in added)
    assert keys == dict.fromkeys((f"prod_{sn}".encode() for sn in sns), 1)


@pytest.mark.slow
async def test_two_redrives_started_together_move_each_record_once(cfg: Config, uid: str) -> None:
    sns = [f"{uid}-{i:04d}" for i in range(2000)]
    await prepare(cfg)
    await _dead_letter(cfg, sns)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        cfg = with_emulator(cfg, emu)
        runs = [await _redrive(cfg, "--batch", "20") for _ in range(2)]
        outcomes = [await _outcome(run) for run in runs]
        # Each finished, or was fenced by the other: together they moved every record once.
        assert sum(_moved(outcome) for outcome in outcomes) == len(sns), outcomes
        assert await _committed(cfg) == len(sns)
        await _allocated_once(cfg, emu, sns)


async def test_a_redrive_killed_in_a_transaction_is_done_again_by_the_next(
    cfg: Config, uid: str
) -> None:
    sns = [f"{uid}-{i:03d}" for i in range(300)]
    t = cfg.kafka.topics
    await prepare(cfg)
    await _dead_letter(cfg, sns)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        cfg = with_emulator(cfg, emu)
        first = await _redrive(cfg, "--batch", "100", paused=True)
        assert await asyncio.wait_for(first.stdout.readline(), 60) == b"paused\n"  # type: ignore[union-attr]
        # Its first batch is committed, offsets with it; the second batch's records are in
        # the added topic, uncommitted: the sink (read committed) does not see them.
        assert await _committed(cfg) == 100
        assert await _records(cfg, t.added, isolation_level="read_uncommitted") == 200
        assert await _records(cfg, t.added, isolation_level="read_committed") == 100
        await kill(first)
        # The next run aborts what the killed one left open and moves the rest.
        assert await _outcome(await _redrive(cfg, "--batch", "100")) == (
            0,
            "moved 200 records\n",
            "",
        )
        assert await _committed(cfg) == len(sns)
        await _allocated_once(cfg, emu, sns)


async def test_a_redrive_taken_over_stops_fenced_and_commits_nothing_more(
    cfg: Config, uid: str
) -> None:
    sns = [f"{uid}-{i:03d}" for i in range(300)]
    await prepare(cfg)
    await _dead_letter(cfg, sns)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        cfg = with_emulator(cfg, emu)
        first = await _redrive(cfg, "--batch", "100", paused=True)
        assert await asyncio.wait_for(first.stdout.readline(), 60) == b"paused\n"  # type: ignore[union-attr]
        # A second run starts while the first is in its second transaction: it fences the
        # first (aborting that transaction) and moves everything after the first's commit.
        assert await _outcome(await _redrive(cfg, "--batch", "100")) == (
            0,
            "moved 200 records\n",
            "",
        )
        first.stdin.write(b"go on\n")  # type: ignore[union-attr]
        code, out, err = await _outcome(first)
        assert (code, out, _moved((code, out, err))) == (1, "", 100)
        assert await _committed(cfg) == len(sns)
        await _allocated_once(cfg, emu, sns)
