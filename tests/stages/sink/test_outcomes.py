"""Outcomes Kafka will not take: too large ones are dead-lettered, others end the stage."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec
import pytest
from aiokafka.admin import NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
    UnknownError,
)

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.errors import StageFailed
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.schemas import AllocationFailure
from pipeline.stages import runtime
from pipeline.stages.sink import Sink
from pipeline.stages.sink.outcomes import _retriable
from tests.harness import read_topic, running
from tests.stages.sink.support import (
    GROUP,
    check_allocation,
    child,
    prepare,
    produce,
    produce_children,
    source_of,
    with_emulator,
)


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        (KafkaTimeoutError(), True),  # aiokafka says not retriable; a retry is what helps
        (KafkaConnectionError(), True),
        (NotLeaderForPartitionError(), True),
        (UnknownError(), False),
        (TopicAuthorizationFailedError(), False),
        (ValueError("not a Kafka error"), False),
    ],
)
def test_which_errors_are_retried(error: Exception, retriable: bool) -> None:
    assert _retriable(error) is retriable


def small_records(cfg: Config) -> Config:
    """Kafka takes records up to 256 KiB here (the default is 2 MiB), so big ones stay small."""
    return msgspec.structs.replace(
        cfg, kafka=msgspec.structs.replace(cfg.kafka, max_record_size=256 * 1024)
    )


async def backlog(cfg: Config) -> int:
    return await kafka.backlog(cfg.kafka, cfg.sink.group_id, cfg.kafka.topics.added)


@pytest.mark.services
async def test_an_allocation_too_large_for_kafka_is_dead_lettered_with_the_reason(
    cfg: Config, uid: str
) -> None:
    cfg = small_records(cfg)
    big, fine = f"{uid}-big", f"{uid}-fine"
    devices: list[dict[str, Any]] = [
        {"sn": big, "group_id": GROUP, "device_data": {"blob": "x" * 300_000}},
        {"sn": fine, "group_id": GROUP},
    ]
    await prepare(cfg)
    async with await start_emulator(devices=devices) as emu:
        cfg = with_emulator(cfg, emu)
        values = [child(big), child(fine)]
        sources = await produce_children(cfg, values)
        async with running(Sink(cfg), Health()):
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)
        calls = list(emu.state.calls)
        left = await backlog(cfg)

    assert [c.sn for c in calls if c.sn == big] == [big]  # allocated once, not retried
    assert [r.key for r in got] == [fine.encode()]
    check_allocation(cfg, got[0], fine)
    [record] = dlq
    assert record.key == big.encode()
    assert source_of(record) == sources[0]
    failure = msgspec.json.decode(record.value, type=AllocationFailure)
    assert (failure.sn, failure.error_kind, failure.code, failure.attempts) == (
        big,
        "invalid",
        None,
        1,
    )
    assert bytes(failure.record) == values[0]
    match = re.fullmatch(
        r"DPS allocated the device \(requestId (\S+)\), but its allocation record "
        r"\((\d+) bytes\) is too large for Kafka: \[Error 10\] MessageSizeTooLargeError: "
        r"The message is (\d+) bytes when serialized "
        r"which is larger than the maximum request size you have configured with the "
        r"max_request_size configuration",
        failure.msg,
    )
    assert match is not None, failure.msg
    assert match.group(1) == failure.request_id
    assert int(match.group(2)) > 300_000
    assert left == 0  # both records are done and committed


@pytest.mark.services
async def test_a_dlq_record_too_large_for_kafka_points_at_its_input(cfg: Config, uid: str) -> None:
    # Not JSON, and every byte needs escaping in the DLQ record's JSON string: the input
    # fits in Kafka, its DLQ record (about twice the size) does not.
    cfg = small_records(cfg)
    value = b'"' * 150_000
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu)
        [source] = await produce(cfg, [(b"big", value)])
        async with running(Sink(cfg), Health()):
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)
        left = await backlog(cfg)

    [record] = dlq
    assert source_of(record) == source
    failure = msgspec.json.decode(record.value, type=AllocationFailure)
    assert (failure.error_kind, failure.sn, failure.attempts) == ("invalid", None, 0)
    assert failure.msg == "not an added-child record: Expected `object`, got `str`"
    assert msgspec.json.decode(failure.record) == (
        f"omitted: 150000 bytes, too large for Kafka; read it at {source.decode()}"
    )
    assert left == 0


@pytest.mark.services
async def test_an_outcome_kafka_refuses_for_good_ends_the_stage(cfg: Config, uid: str) -> None:
    # A compacted DLQ topic refuses records without a key (an unreadable input has no
    # sn): retrying cannot help, so the stage stops instead of retrying forever.
    dlq = cfg.kafka.topics.allocations_dlq
    async with kafka.admin(cfg.kafka) as admin:
        await admin.create_topics(
            [NewTopic(dlq, 1, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu)
        await produce(cfg, [(b"k", b"not json"), (b"k", child(f"{uid}-after"))])
        with pytest.raises(StageFailed) as caught:
            await asyncio.wait_for(runtime.run(Sink(cfg), asyncio.Event()), 60)
        left = await backlog(cfg)

    assert str(caught.value) == (
        f"cannot record an outcome in {dlq}: UnknownError: [Error -1] UnknownError (not retriable)"
    )
    assert isinstance(caught.value.__cause__, UnknownError)
    assert left == 2  # the refused record, and the one after it, are not committed
