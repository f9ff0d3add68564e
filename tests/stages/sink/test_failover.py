"""Failover between sink replicas: how soon a SIGKILLed sink's partitions are served again.

Two ``pipeline sink`` processes share a group on a topic of six partitions. One is
SIGKILLed while records flow. The group drops it once its session times out (aiokafka's
default, 10 s, with a heartbeat every 3 s); the survivor hands back its own calls in
flight, is assigned every partition, reads back the outcomes recorded past the committed
offsets (a task of its own, not the assignment callback), and only then starts the dead
one's records. Measured from the SIGKILL: until the group (``describe_consumer_groups``)
gives the survivor every partition ("moved"), and until DPS has allocated a record of
each of the dead one's partitions for the survivor ("served"). ``-s`` shows both.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.errors import KafkaError

from pipeline.config import Config
from pipeline.dps.emulator import CallRecord, start_emulator
from pipeline.io import kafka
from tests.harness import audit_holds, kill, read_topic, spawn, terminate
from tests.stages.sink.support import (
    GROUP,
    Tail,
    child,
    key_of,
    ok,
    ok_calls,
    produce_children,
    source_of,
    with_emulator,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

PARTITIONS = 6
FAILOVER_LIMIT = 15.0
"""Seconds from the SIGKILL until the survivor serves every partition of the dead one."""


def where(source: bytes) -> TopicPartition:
    topic, partition, _ = source.decode().rsplit("/", 2)
    return TopicPartition(topic, int(partition))


async def members(admin: AIOKafkaAdminClient, group: str) -> tuple[str, dict[str, set[int]]]:
    """The group's state, and each member's partitions by its client id."""
    try:
        (response,) = await admin.describe_consumer_groups([group])
    except KafkaError as exc:
        if not exc.retriable:  # e.g. the coordinator still loading the group: ask again
            raise
        return type(exc).__name__, {}
    # DescribeGroups v0-v3: (error, group, state, protocol type, protocol, members), each
    # member (member id, client id, client host, metadata, assignment).
    described = response.groups[0]
    assigned: dict[str, set[int]] = {}
    for member in described[5]:
        client_id, assignment = member[1], member[4]
        parts = ConsumerProtocol.ASSIGNMENT.decode(assignment).partitions() if assignment else []
        assigned[client_id] = {tp.partition for tp in parts}
    return described[2], assigned


class Replicas:
    """``pipeline sink`` processes in one group, each named by its Kafka client id.

    Every wait here fails at once, with its log, if a sink still meant to run exited.
    """

    def __init__(self, cfg: Config, admin: AIOKafkaAdminClient, logs: Path) -> None:
        self._cfg = cfg
        self._admin = admin
        self._logs = logs
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, env: dict[str, str]) -> None:
        env = env | {"KAFKA__CLIENT_ID": name}
        self.procs[name] = await spawn("sink", self._cfg, env=env, log=self._logs / name)

    async def kill(self, name: str) -> None:
        await kill(self.procs.pop(name))

    async def stop(self, name: str) -> None:
        """SIGTERM: it must exit 0, and without a traceback in its log."""
        assert await terminate(self.procs.pop(name)) == 0, self.log(name)
        assert "Traceback" not in self.log(name), self.log(name)

    def log(self, name: str) -> str:
        path = self._logs / name
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.returncode is None, f"{name} exited:\n{self.log(name)}"

    async def until(self, check: Callable[[], bool], what: str, *, timeout: float = 60) -> float:
        """The moment (``time.monotonic()``) ``check`` holds."""
        deadline = time.monotonic() + timeout
        while not check():
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.01)
        return time.monotonic()

    async def group_is(
        self, want: Callable[[dict[str, set[int]]], bool], what: str, *, timeout: float = 60
    ) -> tuple[float, dict[str, set[int]]]:
        """The moment the group is Stable with an assignment ``want`` accepts, and it."""
        deadline = time.monotonic() + timeout
        while True:
            state, assigned = await members(self._admin, self._cfg.sink.group_id)
            if state == "Stable" and want(assigned):
                return time.monotonic(), assigned
            self.check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what} (group {state}: {assigned})")
            await asyncio.sleep(0.02)


class Allocations:
    """Allocations per partition the emulator answered since a point, read as it goes."""

    def __init__(self, calls: list[CallRecord], start: int, partition_of: dict[str, int]) -> None:
        self._calls = calls
        self._seen = start
        self._unanswered: list[CallRecord] = []
        self._partition_of = partition_of
        self.per_partition: collections.Counter[int] = collections.Counter()

    def update(self) -> collections.Counter[int]:
        # A call is logged when it arrives and answered later (or never: its caller was
        # killed): those not answered yet are looked at again next time.
        calls = self._unanswered + self._calls[self._seen :]
        self._seen = len(self._calls)
        self._unanswered = [c for c in calls if c.http_status is None]
        for call in calls:
            if ok(call) and call.sn in self._partition_of:
                self.per_partition[self._partition_of[call.sn]] += 1
        return self.per_partition


def nothing_lost_few_repeated(
    sns: list[str],
    got: list[ConsumerRecord[bytes, bytes]],
    dlq: list[ConsumerRecord[bytes, bytes]],
    calls: list[CallRecord],
    *,
    bound: int,
) -> None:
    """Every sn allocated; DPS called again for at most ``bound`` (the calls in flight)."""
    assert dlq == []
    assert {r.key for r in got} == {sn.encode() for sn in sns}
    per_sn = collections.Counter(c.sn for c in calls if ok(c))
    assert set(per_sn) == set(sns)
    repeated_calls = sum(per_sn.values()) - len(sns)
    assert repeated_calls <= bound, f"{repeated_calls} sns allocated again after the kill"
    # An sn has more than one outcome only if DPS was really called more than once for it.
    outcomes = collections.Counter(r.key.decode() for r in got)
    assert len(got) - len(sns) <= bound
    assert all(per_sn[sn] >= n for sn, n in outcomes.items())
    assert all(source_of(r) for r in got)


async def produce_into(cfg: Config, placed: dict[int, list[str]]) -> None:
    """Produce children of ``placed[partition]`` straight into those partitions."""
    topic = cfg.kafka.topics.added
    async with kafka.producer(cfg.kafka) as producer:
        values = [(partition, child(sn)) for partition, sns in placed.items() for sn in sns]
        futures = [
            await producer.send(topic, value, key=key_of(value), partition=partition)
            for partition, value in values
        ]
        await asyncio.gather(*futures)


async def test_a_sigkilled_sinks_partitions_are_served_by_another_replica_within_15_s(
    cfg: Config, uid: str, tmp_path: Path
) -> None:
    concurrency, detached = 32, 8  # detached: calls DPS was late to answer, slot given back
    flowing_sns = [f"{uid}-{i:04d}" for i in range(600)]
    # Produced into the dead sink's partitions once it is dead: the survivor has records
    # of each of them to take over, whichever it reaches first.
    late_sns = [f"{uid}-late-{i:03d}" for i in range(90)]
    sns = flowing_sns + late_sns
    env = {
        "SINK__RETRY_INITIAL": "0.2",
        "SINK__RETRY_MAX": "2",
        "SINK__DPS__TIMEOUT": "5",
        # Outcomes recorded but not committed pile up: only the read-back keeps the
        # survivor from allocating them again.
        "SINK__COMMIT_INTERVAL": "5",
    }
    victim, survivor = f"sink-a-{uid}", f"sink-b-{uid}"
    everything = set(range(PARTITIONS))
    await kafka.ensure_topics(cfg.kafka, cfg.kafka.topics.all(), partitions=PARTITIONS)
    devices = [{"sn": sn, "group_id": GROUP} for sn in sns]
    async with await start_emulator(devices=devices) as emu, kafka.admin(cfg.kafka) as admin:
        emu.state.set_faults({"latency_ms": 50})
        cfg = with_emulator(cfg, emu, concurrency=concurrency, detached_limit=detached)
        sinks = Replicas(cfg, admin, tmp_path)
        for name in (victim, survivor):
            await sinks.start(name, env)
        # Both in the group, three partitions each, before the first record.
        _, assigned = await sinks.group_is(
            lambda a: set(a) == {victim, survivor} and all(a.values()), "both sinks in the group"
        )
        theirs = sorted(assigned[victim])
        assert len(theirs) == PARTITIONS // 2, assigned

        sources = await produce_children(cfg, [child(sn) for sn in flowing_sns])
        partition_of = {sn: where(s).partition for sn, s in zip(flowing_sns, sources, strict=True)}
        # Killed near the end of its share, with records in flight and more waiting, so
        # that the survivor's first records of its partitions do not queue behind hundreds
        # of others (a sink takes a partition's fetched records in order, one partition
        # after another): what is measured is the failover, not the survivor's backlog.
        share = collections.Counter(partition_of.values())
        flowing = Allocations(emu.state.calls, 0, partition_of)

        def left_to_kill() -> int:
            done = flowing.update()
            return sum(share[p] - done[p] for p in theirs)

        await sinks.until(
            lambda: left_to_kill() <= 3 * concurrency, "the sink to kill near the end of its share"
        )

        killed_at = time.monotonic()
        await sinks.kill(victim)
        since_kill = Allocations(emu.state.calls, len(emu.state.calls), partition_of)
        placed = {p: late_sns[i :: len(theirs)] for i, p in enumerate(theirs)}
        partition_of |= {sn: p for p, placed_sns in placed.items() for sn in placed_sns}
        await produce_into(cfg, placed)
        allocated = {c.sn for c in ok_calls(emu)}
        assert any(partition_of[sn] in theirs for sn in flowing_sns if sn not in allocated), (
            "the kill came after the dead sink's share of the stream"
        )

        (moved_at, _), served_at = await asyncio.gather(
            sinks.group_is(lambda a: a == {survivor: everything}, "the survivor with all"),
            sinks.until(
                lambda: set(theirs) <= set(since_kill.update()),
                "the dead sink's partitions served by the survivor",
            ),
        )
        moved, served = moved_at - killed_at, served_at - killed_at
        print(  # noqa: T201
            f"\nfailover after SIGKILL: the group moved the partitions in {moved:.1f} s, "
            f"the survivor served them in {served:.1f} s (limit {FAILOVER_LIMIT:g} s)"
        )

        async with Tail(cfg.kafka, cfg.kafka.topics.allocations) as tail:

            async def alive() -> None:
                sinks.check_alive()

            await tail.until(
                lambda _: tail.keys() == {sn.encode() for sn in sns},
                "every sn in dps.allocations",
                timeout=120,
                alive=alive,
            )
        await sinks.stop(survivor)
        got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=len(sns))
        dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq)
        calls = list(emu.state.calls)

    assert served <= FAILOVER_LIMIT, f"served {served:.1f} s after the SIGKILL"
    nothing_lost_few_repeated(sns, got, dlq, calls, bound=concurrency + detached)
    # The oracle: each child exactly one outcome (no router ran: outcomes only).
    await audit_holds(cfg, only="outcomes", children=len(sns))
