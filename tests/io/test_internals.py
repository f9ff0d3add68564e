"""Every reach-in past a library's public API, pinned: an upgrade that moves one fails here.

Each test names the function of ``pipeline/io/_aiokafka_internals.py`` or
``pipeline/io/_aiomqtt_internals.py`` that relies on what it checks, and none needs a
broker: ``make test-latest`` runs them against the newest versions pyproject allows.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import ConcurrentTransactions, KafkaConnectionError, ProducerFenced
from aiokafka.producer import sender
from aiokafka.producer.message_accumulator import MessageAccumulator, MessageBatch
from aiokafka.producer.sender import AddPartitionsToTxnHandler
from aiokafka.producer.transaction_manager import TransactionManager
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from pipeline.config import KafkaConfig, MqttConfig
from pipeline.errors import ServiceUnreachable
from pipeline.io import _aiokafka_internals, _aiomqtt_internals, kafka, mqtt
from pipeline.tools.services import free_port
from tests.harness import ROOT


def moved(reach_in: str, what: str) -> str:
    """The failure message: which reach-in broke, and what the library changed."""
    return f"{reach_in} no longer holds: {what} (see its docstring for what would remove it)"


# --------------------------------------------------------------------------------------
# aiokafka


BACKOFF = "_aiokafka_internals.set_concurrent_transactions_backoff"


async def test_aiokafka_waits_backoff_override_after_concurrent_transactions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(getattr(sender, "BACKOFF_OVERRIDE", None), float), moved(
        BACKOFF, "aiokafka.producer.sender.BACKOFF_OVERRIDE is gone"
    )
    monkeypatch.setattr(sender, "BACKOFF_OVERRIDE", sender.BACKOFF_OVERRIDE)  # restored after
    kafka.shorten_transaction_backoff()
    txn = TransactionManager("t", 60_000)
    owner = types.SimpleNamespace(_txn_manager=txn, _retry_backoff=0.1)
    handler = AddPartitionsToTxnHandler(owner, [TopicPartition("out", 0)])
    response = types.SimpleNamespace(errors=[("out", [(0, ConcurrentTransactions.errno)])])
    assert handler.handle_response(response) == kafka.TXN_RESTART_BACKOFF == 0.002, moved(
        BACKOFF, "the first partition of a transaction no longer waits BACKOFF_OVERRIDE"
    )
    other = TopicPartition("out", 1)
    txn._pending_txn_partitions.add(other)  # later in the transaction: aiokafka's own backoff
    txn.partition_added(other)
    assert handler.handle_response(response) == 0.1


def test_no_library_is_changed_by_importing_the_pipeline() -> None:
    # The backoff is applied when the router starts, never when a module is imported.
    code = (
        "import importlib, pkgutil, pipeline, aiokafka.producer.sender as s\n"
        "before = s.BACKOFF_OVERRIDE\n"
        "for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "assert s.BACKOFF_OVERRIDE == before, s.BACKOFF_OVERRIDE"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


FATAL = "_aiokafka_internals.retrieve_fatal_error"


async def test_a_fenced_producers_futures_are_retrieved_once_stopped() -> None:
    txn = TransactionManager("t", 60_000)
    txn.set_pid_and_epoch(1, 0)
    txn.begin_transaction()
    accumulator = MessageAccumulator(None, 16_384, None, 30.0, txn_manager=txn)
    batch = MessageBatch(TopicPartition("out", 0), None, 30.0, 0)
    accumulator._batches[batch.tp].append(batch)
    # As the sender does when a newer producer took over (Sender._fail_all):
    accumulator.fail_all(ProducerFenced())
    txn.fatal_error(ProducerFenced())
    waiters = {"_transaction_waiter": txn, "_drain_waiter": batch}
    for name, owner in waiters.items():
        waiter = getattr(owner, name, None)
        assert isinstance(waiter, asyncio.Future), moved(FATAL, f"no {name} future")
        assert waiter._log_traceback, moved(FATAL, f"{name} no longer gets the error")
    producer = types.SimpleNamespace(_txn_manager=txn, _message_accumulator=accumulator)
    _aiokafka_internals.retrieve_fatal_error(producer)
    for name, owner in waiters.items():
        assert not getattr(owner, name)._log_traceback


SEND = "_aiokafka_internals.send_to_node"


async def test_the_admin_client_sends_a_request_to_the_node_named() -> None:
    method = getattr(AIOKafkaAdminClient, "_send_request", None)
    assert method is not None, moved(SEND, "AIOKafkaAdminClient._send_request is gone")
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters)[:3] == ["self", "request", "node_id"], moved(
        SEND, f"_send_request{inspect.signature(method)}"
    )
    client = AIOKafkaAdminClient(bootstrap_servers="127.0.0.1:1")
    sent: list[tuple[int, object]] = []

    async def send(node_id: int, request: object) -> str:
        sent.append((node_id, request))
        return "response"

    assert isinstance(client._client, AIOKafkaClient)
    client._client.send = send
    request = object()
    assert await _aiokafka_internals.send_to_node(client, request, 7) == "response"
    assert sent == [(7, request)], moved(SEND, "_send_request does not send to node_id")
    await client.close()


METADATA = "_aiokafka_internals.fetch_metadata"


async def test_the_consumer_client_updates_metadata_for_the_topics_named() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
    try:
        inner = getattr(consumer, "_client", None)
        assert isinstance(inner, AIOKafkaClient), moved(METADATA, "AIOKafkaConsumer._client")
        method = getattr(AIOKafkaClient, "_metadata_update", None)
        assert method is not None, moved(METADATA, "AIOKafkaClient._metadata_update is gone")
        assert inspect.iscoroutinefunction(method)
        assert list(inspect.signature(method).parameters) == [
            "self",
            "cluster_metadata",
            "topics",
        ], moved(METADATA, f"_metadata_update{inspect.signature(method)}")
        asked: list[object] = []
        answer = types.SimpleNamespace(brokers=[(0, "h", 1, None)])

        async def conn(node_id: object, **_: Any) -> object:
            async def send(request: Any) -> Any:
                asked.append(request._topics)
                return answer

            return types.SimpleNamespace(send=send)

        class Recording(ClusterMetadata):  # type: ignore[misc]
            def update_metadata(self, metadata: object) -> None:
                asked.append(metadata)

        real = inner.cluster  # the client's own metadata is left alone
        inner.cluster = types.SimpleNamespace(brokers=lambda: [types.SimpleNamespace(nodeId=0)])
        inner._get_conn = conn
        assert await _aiokafka_internals.fetch_metadata(consumer, Recording(), ["a", "b"])
        assert asked == [["a", "b"], answer], moved(METADATA, "it does not ask for the topics")
        # No broker answered: False, not an exception (partitions() raises its own).
        inner.cluster = real
        assert not await _aiokafka_internals.fetch_metadata(consumer, ClusterMetadata(), ["a"])
    finally:
        await consumer.stop()


async def test_a_client_that_cannot_bootstrap_says_so_in_words() -> None:
    # Not a reach-in, a translation by type: aiokafka's start() raises
    # KafkaConnectionError naming only its parsed host list when no server answered.
    cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}")
    for make in (kafka.admin, kafka.reader, kafka.producer):
        with pytest.raises(KafkaConnectionError) as caught:
            async with make(cfg):
                pass
        assert caught.value.args == ("no bootstrap server answered (aiokafka logs why at debug)",)
        assert isinstance(caught.value.__cause__, KafkaConnectionError)


# --------------------------------------------------------------------------------------
# aiomqtt, paho-mqtt and the event loop

PAHO = "_aiomqtt_internals.paho_client"


async def test_aiomqtt_wraps_a_paho_client_with_manual_acks() -> None:
    client = mqtt.connect(MqttConfig())
    inner = _aiomqtt_internals.paho_client(client)
    assert isinstance(inner, paho.Client), moved(PAHO, "aiomqtt.Client._client is no paho Client")
    assert inner._manual_ack is False
    mqtt.manual_ack(client)
    assert inner._manual_ack is True, moved(PAHO, "paho's manual_ack_set(on=True)")
    assert list(inspect.signature(paho.Client.ack).parameters) == ["self", "mid", "qos"]
    assert "properties" in inspect.signature(paho.Client.disconnect).parameters, moved(
        PAHO, "paho's disconnect() takes no properties"
    )
    assert inner.is_connected() is False
    assert inner.socket() is None


async def test_what_paho_hands_aiomqtt_is_what_waits_in_client_messages() -> None:
    # IntakeLimit wraps paho's on_message (aiomqtt's) and counts len(client.messages).
    client = mqtt.connect(MqttConfig())
    inner = _aiomqtt_internals.paho_client(client)
    assert inner.on_message is not None, moved(PAHO, "aiomqtt sets no paho on_message")
    message = paho.MQTTMessage(mid=1, topic=b"t")
    message.payload = b"x"
    inner.on_message(inner, None, message)
    assert len(client.messages) == 1, moved(PAHO, "on_message no longer queues for .messages")


async def test_packets_queued_together_go_out_in_one_send_after_what_paho_queued() -> None:
    # mqtt.ack_all queues a run of PUBACKs as one packet of paho's.
    client = mqtt.connect(MqttConfig())
    mqtt.manual_ack(client)
    inner = _aiomqtt_internals.paho_client(client)
    inner.on_socket_register_write = None  # no event loop's writer: paho writes at once
    left, right = socket.socketpair()
    sends: list[bytes] = []
    send = inner._sock_send

    def counted(data: bytes | bytearray) -> int:
        sends.append(bytes(data))
        return send(data)

    with left, right:
        inner._sock = left
        inner._sock_send = counted  # type: ignore[method-assign,assignment]
        inner.ack(7, 1)
        run = b"@\x02\x00\x08@\x02\x00\x09"
        _aiomqtt_internals.queue_packets(inner, paho.PUBACK, run)
        assert sends == [b"@\x02\x00\x07", run], moved(
            "_aiomqtt_internals.queue_packets", "paho's _packet_queue no longer writes as given"
        )
        assert right.recv(64) == b"@\x02\x00\x07" + run
        assert not inner.want_write()
        inner._sock = None


async def test_paho_reads_a_buffered_socket_a_chunk_at_a_time() -> None:
    # mqtt.buffer_reads: paho's reads come from a chunk; aiomqtt's reader drains it.
    client = mqtt.connect(MqttConfig())
    inner = _aiomqtt_internals.paho_client(client)
    assert _aiomqtt_internals.buffer_reads(inner) is None  # not connected
    left, right = socket.socketpair()
    left.setblocking(False)
    with left, right:
        inner._sock = left
        buffered = _aiomqtt_internals.buffer_reads(inner)
        assert isinstance(buffered, _aiomqtt_internals.BufferedSocket)
        assert buffered.fileno() == left.fileno()  # the rest is the socket's
        pingresps = b"\xd0\x00" * 3
        right.sendall(pingresps)
        assert inner._sock_recv(1) == b"\xd0"  # one system call read all three
        assert buffered.pending() == 5
        buffered.held = True
        assert buffered.pending() == 0
        buffered.held = False
        assert inner._sock_recv(10) == pingresps[1:]  # no more than was read
        with pytest.raises(BlockingIOError):
            inner._sock_recv(1)
        right.sendall(b"\xd0")
        assert inner._sock_recv(4) == b"\xd0"
        right.close()
        assert inner._sock_recv(1) == b""  # end of stream, as the socket says it
        assert _aiomqtt_internals.buffer_reads(inner) is buffered, "wrapped once"
        assert inner.socket() is buffered, moved(
            "_aiomqtt_internals.buffer_reads", "paho no longer keeps its socket in _sock"
        )
        inner._sock = None


async def test_aiomqtt_reads_pahos_socket_with_an_event_loop_reader() -> None:
    # IntakeLimit takes that reader away while messages wait, and puts it back.
    loop = asyncio.get_running_loop()
    client = mqtt.connect(MqttConfig())
    inner = _aiomqtt_internals.paho_client(client)
    left, right = socket.socketpair()
    with left, right:
        client._on_socket_open(inner, None, left)
        await asyncio.sleep(0)  # aiomqtt registers it with call_soon_threadsafe
        reader = _aiomqtt_internals.take_reader(loop, left.fileno())
        assert reader is not None, moved(
            "_aiomqtt_internals.take_reader", "aiomqtt no longer reads with loop.add_reader"
        )
        _aiomqtt_internals.put_reader(loop, left.fileno(), reader)
        client._on_socket_close(inner, None, left)
        await asyncio.sleep(0)


async def test_a_reader_is_taken_from_the_loop_and_put_back() -> None:
    loop = asyncio.get_running_loop()
    assert _aiomqtt_internals.pausable(loop), moved(
        "_aiomqtt_internals.take_reader", "the default event loop has no _selector"
    )
    left, right = socket.socketpair()
    with left, right:
        called = asyncio.Event()
        loop.add_reader(left.fileno(), called.set)
        taken = _aiomqtt_internals.take_reader(loop, left.fileno())
        assert taken == (called.set, ()), moved(
            "_aiomqtt_internals.take_reader", "a reader handle has no _callback/_args"
        )
        assert not loop.remove_reader(left.fileno())  # it is not registered any more
        assert _aiomqtt_internals.take_reader(loop, left.fileno()) is None
        _aiomqtt_internals.put_reader(loop, left.fileno(), taken)
        right.send(b"x")
        async with asyncio.timeout(5):
            await called.wait()
        loop.remove_reader(left.fileno())


async def test_a_refused_connection_is_told_by_its_type() -> None:
    # aiomqtt raises MqttError(str(exc)) from None: the OSError is its __context__.
    port = free_port()
    with pytest.raises(aiomqtt.MqttError) as caught:
        async with aiomqtt.Client("127.0.0.1", port):
            pass
    assert isinstance(_aiomqtt_internals.os_error_behind(caught.value), ConnectionRefusedError), (
        moved("_aiomqtt_internals.os_error_behind", "the OSError is not the __context__")
    )
    with pytest.raises(ServiceUnreachable) as unreachable:
        async with mqtt.connected(MqttConfig(port=port), mqtt.connect(MqttConfig(port=port))):
            pass
    assert unreachable.value.reason == "connection refused"


def test_a_refusal_is_told_by_its_code() -> None:
    not_authorized = MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=135))
    assert mqtt._refusal(not_authorized.rc) == "Not authorized"
    assert str(not_authorized) == "[code:135] Not authorized"  # what it said in words
    assert mqtt._refusal(5) == paho.connack_string(5)


def test_private_names_of_libraries_are_used_only_in_the_internals_modules() -> None:
    allowed = {"_aiokafka_internals.py", "_aiomqtt_internals.py"}
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "pipeline").rglob("*.py")
        if path.name not in allowed
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "SLF001" in line
    ]
    assert not found, f"reach into a library only from pipeline/io/_*_internals.py: {found}"


def test_the_internals_modules_say_why_and_what_would_remove_each_reach_in() -> None:
    for module in (_aiokafka_internals, _aiomqtt_internals):
        assert "Checked against" in (module.__doc__ or "")
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and obj.__name__ not in {"pausable", "put_reader"}:
                doc = inspect.getdoc(obj) or ""
                assert "Why:" in doc, f"{module.__name__}.{name}"
                assert "What would remove it:" in doc, f"{module.__name__}.{name}"
    assert Path(_aiokafka_internals.__file__).parent.name == "io"
