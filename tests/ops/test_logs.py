"""JSON logs, and the Kafka client's retries kept below warning (records as aiokafka emits
them: the messages are copied from its source, the loggers are its own)."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    NodeNotReadyError,
    NotEnoughReplicasError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
)

from pipeline.ops.logs import LibraryNoise
from pipeline.tools.services import free_port

Setup = Callable[[str], io.StringIO]

# (logger, level, message, args): transient conditions aiokafka retries by itself.
TRANSIENT = [
    # `make demo` on a fresh broker: the group coordinator is still loading.
    ("aiokafka.consumer.group_coordinator", logging.ERROR,
     "Group Coordinator Request failed: %s", (GroupCoordinatorNotAvailableError(),)),
    ("aiokafka.consumer.group_coordinator", logging.WARNING,
     "Marking the coordinator dead (node %s)for group %s.", (1, "iot-pipeline-router")),
    ("aiokafka.consumer.group_coordinator", logging.WARNING,
     "Heartbeat failed for group %s: coordinator (node %s) is either not started or not valid",
     ("iot-pipeline-sink", 1)),
    ("aiokafka.consumer.group_coordinator", logging.ERROR,
     "Error sending %s to node %s [%s] -- marking coordinator dead",
     ("HeartbeatRequest_v1", 1, KafkaConnectionError("Connection at 127.0.0.1:9092 closed"))),
    # A Kafka outage: the same few lines, hundreds of times.
    ("aiokafka", logging.ERROR, 'Unable connect to "%s:%s": %s',
     ("127.0.0.1", 9092, ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9092)"))),
    ("aiokafka", logging.ERROR, "Unable connect to node with id %s: %s",
     (1, KafkaConnectionError("Connection at 127.0.0.1:9092 closed"))),
    ("aiokafka", logging.ERROR, "Unable to update metadata from %s", ([1],)),
    ("aiokafka.consumer.fetcher", logging.ERROR, "Failed fetch messages from %s: %s",
     (1, NodeNotReadyError("Attempt to send a request to node which is not ready (node id 1)."))),
    ("aiokafka.producer.sender", logging.WARNING, "Cannot send %r to %s: %r",
     ("AddPartitionsToTxnRequest", 1, NodeNotReadyError())),
    # A topic just created, not yet in the metadata (`make demo` on a fresh broker).
    ("aiokafka.cluster", logging.ERROR, "Topic %s not found in cluster metadata",
     ("iotda.down-events",)),
    # Leader changes, and produce retries (the router's NotEnoughReplicas).
    ("aiokafka.producer.sender", logging.WARNING,
     "Got error produce response on topic-partition %s, retrying. Error: %s",
     (TopicPartition("iotda.subdevices.added", 0), NotEnoughReplicasError)),
    ("aiokafka.producer.sender", logging.WARNING,
     "Got error produce response on topic-partition %s, retrying. Error: %s",
     (TopicPartition("iotda.subdevices.added", 1), NotLeaderForPartitionError)),
    ("aiokafka.consumer.fetcher", logging.WARNING,
     "Attempt to fetch offsets for partition %s failed due to: %s",
     (TopicPartition("iotda.down-events", 2), NotLeaderForPartitionError)),
]  # fmt: skip


def _emit(logger: str, level: int, message: str, args: tuple[object, ...]) -> None:
    logging.getLogger(logger).log(level, message, *args)


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(("logger", "level", "message", "args"), TRANSIENT)
def test_transient_conditions_stay_below_warning(
    json_logs: Setup, logger: str, level: int, message: str, args: tuple[object, ...]
) -> None:
    out = json_logs("info")
    _emit(logger, level, message, args)
    assert out.getvalue() == ""


@pytest.mark.parametrize(("logger", "level", "message", "args"), TRANSIENT)
def test_transient_conditions_are_debug_at_debug(
    json_logs: Setup, logger: str, level: int, message: str, args: tuple[object, ...]
) -> None:
    out = json_logs("debug")
    for _ in range(3):  # demoted, not rate-limited: debug shows every one
        _emit(logger, level, message, args)
    records = _records(out)
    assert [(r["level"], r["logger"]) for r in records] == [("debug", logger)] * 3
    assert records[0]["msg"] == message % args


def test_other_library_errors_show_once_a_minute(json_logs: Setup) -> None:
    out = json_logs("info")
    log = logging.getLogger("aiokafka.consumer.group_coordinator")
    for partition in range(5):
        log.error(
            "OffsetCommit failed for group %s on partition %s with offset %s: %s",
            "iot-pipeline-sink", partition, 7, TopicAuthorizationFailedError.__name__,
        )  # fmt: skip
    log.error("OffsetCommit failed for unauthorized topics %s", {"dps.allocations"})
    assert [(r["level"], r["msg"]) for r in _records(out)] == [
        (
            "error",
            (
                "OffsetCommit failed for group iot-pipeline-sink on partition 0 with offset 7: "
                "TopicAuthorizationFailedError"
            ),
        ),
        ("error", "OffsetCommit failed for unauthorized topics {'dps.allocations'}"),
    ]


def test_a_repeat_after_the_interval_says_how_many_were_held_back() -> None:
    noise = LibraryNoise(logging.INFO, every=0.2)
    log = logging.getLogger("aiokafka.consumer.fetcher")

    def record() -> logging.LogRecord:
        return log.makeRecord(
            log.name, logging.WARNING, __file__, 0, "Not authorized to read from topic %s.",
            ("iotda.down-events",), None,
        )  # fmt: skip

    first = record()
    assert noise.filter(first)
    assert not hasattr(first, "suppressed")
    assert [noise.filter(record()) for _ in range(4)] == [False] * 4
    time.sleep(0.25)
    later = record()
    assert noise.filter(later)
    assert later.suppressed == 4  # type: ignore[attr-defined]


def test_own_and_other_loggers_untouched(json_logs: Setup) -> None:
    out = json_logs("info")
    for _ in range(2):
        logging.getLogger("pipeline.stages.router").warning(
            "transaction aborted (%s); the batch will be read again in %.1f s",
            KafkaConnectionError("Connection at 127.0.0.1:9092 closed"), 0.5,
        )  # fmt: skip
    logging.getLogger("aiokafkaesque").error("Unable to update metadata from %s", [1])
    assert [(r["level"], r["logger"]) for r in _records(out)] == [
        ("warning", "pipeline.stages.router"),
        ("warning", "pipeline.stages.router"),
        ("error", "aiokafkaesque"),
    ]


async def test_a_real_client_failing_to_connect_logs_nothing_above_debug(
    json_logs: Setup,
) -> None:
    out = json_logs("info")
    consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{free_port()}")
    with pytest.raises(KafkaConnectionError):
        await consumer.start()
    await consumer.stop()
    assert out.getvalue() == ""
    out = json_logs("debug")
    consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{free_port()}")
    with pytest.raises(KafkaConnectionError):
        await consumer.start()
    await consumer.stop()
    assert [(r["level"], r["logger"], str(r["msg"])[:19]) for r in _records(out)] == [
        ("debug", "aiokafka", 'Unable connect to "')  # aiokafka/client.py logs as "aiokafka"
    ]
