"""Replay fixtures: the file format, replay and record through the real Mosquitto, the fixtures."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiomqtt
import msgspec
import orjson
import pytest

from pipeline.config import Config, MqttConfig
from pipeline.errors import InputError, ServiceUnreachable
from pipeline.io import mqtt
from pipeline.tools.replay import FixtureMessage, load_fixture, record, replay
from tests import harness
from tests.harness import DEMO_FIXTURE, FIXTURE_FILES, FIXTURES, worker_env

DOWN_TOPIC = re.compile(r"^\$oc/devices/([^/]+)/sys/events/down$")

services = pytest.mark.services

Received = tuple[str, bytes, int]


def _write(tmp_path: Path, text: str, name: str = "f.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _expected(paths: list[Path], prefix: str = "") -> list[Received]:
    return [(prefix + m.topic, m.payload, m.qos) for p in paths for m in load_fixture(p)]


async def _collect(client: aiomqtt.Client, n: int, quiet: float = 0.2) -> list[Received]:
    """Receive exactly ``n`` messages, then make sure nothing more arrives for ``quiet`` s."""
    received: list[Received] = []
    messages = aiter(client.messages)
    async with asyncio.timeout(15):
        while len(received) < n:
            message = await anext(messages)
            received.append((message.topic.value, message.payload, message.qos))
    try:
        async with asyncio.timeout(quiet):
            extra = await anext(messages)
    except TimeoutError:
        return received
    pytest.fail(f"unexpected extra message on {extra.topic.value}: {extra.payload!r}")


# --------------------------------------------------------------------------------------
# load_fixture


def test_json_payload_is_encoded_compactly(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '{"topic": "a/b", "payload": {"x": [1, 2.5, null, true], "name": "温度 🌡"}}\n'
        '{"topic": "a/b", "payload": null}\n'
        '{"topic": "a/b", "payload": "text"}\n'
        '{"topic": "a/b", "payload": [ ]}\n',
    )
    assert [m.payload for m in load_fixture(path)] == [
        '{"x":[1,2.5,null,true],"name":"温度 🌡"}'.encode(),
        b"null",
        b'"text"',
        b"[]",
    ]


def test_payload_b64_gives_exact_bytes(tmp_path: Path) -> None:
    raw = [b"not json at all", b"", b'{"a": 1}', b"\x00\xff\xfe", '{ "n": "é" }'.encode()]
    lines = [
        orjson.dumps({"topic": "t", "payload_b64": base64.b64encode(b).decode()}).decode()
        for b in raw
    ]
    path = _write(tmp_path, "\n".join(lines))
    assert [m.payload for m in load_fixture(path)] == raw


def test_defaults_and_explicit_values(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '{"topic": "t/1", "payload": 1}\n'
        '{"topic": "t/2", "payload": 2, "qos": 0, "delay_ms": 12.5}\n'
        '{"topic": "t/3", "payload": 3, "qos": 1, "delay_ms": 0}\n',
    )
    assert load_fixture(path) == [
        FixtureMessage(topic="t/1", payload=b"1", qos=1, delay_ms=0.0),
        FixtureMessage(topic="t/2", payload=b"2", qos=0, delay_ms=12.5),
        FixtureMessage(topic="t/3", payload=b"3", qos=1, delay_ms=0.0),
    ]


def test_comments_blank_lines_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf# a comment\r\n\r\n   \r\n{"topic": "t", "payload": 1}\r\n'
        b'  # indented comment\n\t{"topic": "u", "payload": 2}  \n\n'
    )
    assert [(m.topic, m.payload) for m in load_fixture(path)] == [("t", b"1"), ("u", b"2")]


def test_accepts_str_path_and_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "# nothing here\n")
    assert load_fixture(str(path)) == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"topic": "t"}', "exactly one of payload and payload_b64 is required"),
        (
            '{"topic": "t", "payload": 1, "payload_b64": "MQ=="}',
            "exactly one of payload and payload_b64 is required",
        ),
        ('{"topic": "t", "payload": 1, "qos": 2}', "qos must be 0 or 1, got 2"),
        ('{"topic": "t", "payload": 1, "qos": -1}', "qos must be 0 or 1, got -1"),
        ('{"topic": "t", "payload": 1, "qos": "1"}', "Expected `int`, got `str` - at `$.qos`"),
        ('{"topic": "t", "payload_b64": "not base64!"}', "payload_b64 is not valid base64"),
        ('{"topic": "t", "payload_b64": "QQ"}', "payload_b64 is not valid base64"),
        ('{"topic": "t", "payload": 1', "not a JSON line"),
        ("topic: t", "not a JSON line"),
        ("[1, 2]", "invalid fixture line: Expected `object`, got `array`"),
        ('{"payload": 1}', "Object missing required field `topic`"),
        ('{"topic": 5, "payload": 1}', "Expected `str`, got `int` - at `$.topic`"),
        ('{"topic": "", "payload": 1}', "topic is empty"),
        ('{"topic": "a/+/b", "payload": 1}', "contains a wildcard"),
        ('{"topic": "a/#", "payload": 1}', "contains a wildcard"),
        ('{"topic": "t", "payload": 1, "delay_ms": -5}', "delay_ms must be >= 0, got -5"),
        ('{"topic": "t", "payload": 1, "delay": 5}', "unknown field `delay`"),
    ],
)
def test_malformed_line_names_file_line_and_problem(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = _write(tmp_path, '# header\n{"topic": "ok", "payload": 1}\n' + line + "\n")
    with pytest.raises(InputError, match=r"^\S+:\d+: ") as info:
        load_fixture(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message


def test_bad_utf8_line_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"topic": "t\xff", "payload": 1}\n')
    with pytest.raises(InputError, match=r":1: not a JSON line"):
        load_fixture(path)


async def test_replay_checks_every_file_before_connecting(tmp_path: Path) -> None:
    good = _write(tmp_path, '{"topic": "t", "payload": 1}\n', "good.jsonl")
    bad = _write(tmp_path, '{"topic": "t", "payload": 1}\n{"topic": "t"}\n', "bad.jsonl")
    # Port 9 (discard) has no broker: reaching the network would fail differently.
    unreachable = MqttConfig(port=9)
    with pytest.raises(InputError, match=r"bad\.jsonl:2: exactly one of"):
        await replay(unreachable, [good, bad], progress=False)
    with pytest.raises(InputError, match="rate must be > 0"):
        await replay(unreachable, [good], rate=0, progress=False)


async def test_record_rejects_bad_limits(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="count must be >= 0"):
        await record(MqttConfig(port=9), io.StringIO(), count=-1, progress=False)
    with pytest.raises(InputError, match="duration must be >= 0"):
        await record(MqttConfig(port=9), io.StringIO(), duration=-1, progress=False)
    out = io.StringIO()
    assert await record(MqttConfig(port=9), out, count=0, progress=False) == 0
    assert out.getvalue() == ""


async def test_unreachable_broker_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"topic": "t", "payload": 1}\n')
    unreachable = r"^MQTT 127\.0\.0\.1:9 not reachable: connection refused$"
    with pytest.raises(ServiceUnreachable, match=unreachable):
        await replay(MqttConfig(port=9), [path], progress=False)
    with pytest.raises(ServiceUnreachable, match=unreachable):
        await record(MqttConfig(port=9), tmp_path / "out.jsonl", count=1, progress=False)
    assert (tmp_path / "out.jsonl").read_text() == ""


# --------------------------------------------------------------------------------------
# replay through the real Mosquitto


@services
async def test_replay_publishes_every_message_in_order(cfg: Config, uid: str) -> None:
    prefix = f"test/{uid}/"
    files = [
        DEMO_FIXTURE,
        FIXTURES / "unicode_names.jsonl",
        FIXTURES / "malformed.jsonl",
    ]
    expected = _expected(files, prefix)
    async with mqtt.connect(cfg.mqtt, client_id=f"sub-{uid}", persistent=False) as sub:
        await sub.subscribe(f"test/{uid}/#", qos=1)
        count = await replay(
            cfg.mqtt, files, topic_prefix=prefix, progress=False, honour_delays=False
        )
        assert count == len(expected) == 10 + 3 + 18
        assert await _collect(sub, count) == expected


@services
async def test_replay_mixed_qos_delays_and_progress_bar(
    cfg: Config, uid: str, tmp_path: Path
) -> None:
    lines = [
        {"topic": "x/a", "payload": {"n": 0}, "qos": 0},
        {"topic": "x/b", "payload_b64": base64.b64encode(b"\x00raw\xff").decode(), "delay_ms": 30},
        {"topic": "x/a", "payload": {"n": 2}, "qos": 0, "delay_ms": 30},
        {"topic": "x/c", "payload_b64": "", "qos": 1, "delay_ms": 30},
        {"topic": "x/a", "payload": None, "qos": 0},
    ]
    path = _write(tmp_path, "\n".join(orjson.dumps(line).decode() for line in lines))
    prefix = f"test/{uid}/"
    async with mqtt.connect(cfg.mqtt, client_id=f"sub-{uid}", persistent=False) as sub:
        await sub.subscribe(f"test/{uid}/#", qos=1)
        started = time.monotonic()
        count = await replay(cfg.mqtt, [path], topic_prefix=prefix, progress=True)
        elapsed = time.monotonic() - started
        assert count == 5
        assert await _collect(sub, count) == [
            (f"{prefix}x/a", b'{"n":0}', 0),
            (f"{prefix}x/b", b"\x00raw\xff", 1),
            (f"{prefix}x/a", b'{"n":2}', 0),
            (f"{prefix}x/c", b"", 1),
            (f"{prefix}x/a", b"null", 0),
        ]
    assert elapsed >= 0.08  # three 30 ms gaps were honoured


@services
async def test_replay_rate_limit(cfg: Config, uid: str, tmp_path: Path) -> None:
    path = _write(
        tmp_path, "\n".join(f'{{"topic": "r/{i % 3}", "payload": {i}}}' for i in range(10))
    )
    prefix = f"test/{uid}/"
    async with mqtt.connect(cfg.mqtt, client_id=f"sub-{uid}", persistent=False) as sub:
        await sub.subscribe(f"test/{uid}/#", qos=1)
        started = time.monotonic()
        count = await replay(cfg.mqtt, [path], rate=50, topic_prefix=prefix, progress=False)
        elapsed = time.monotonic() - started
        assert count == 10
        assert await _collect(sub, count) == _expected([path], prefix)
    assert elapsed >= 0.15  # nine gaps of 20 ms at 50 msg/s


# --------------------------------------------------------------------------------------
# record through the real Mosquitto


@services
async def test_record_round_trips_through_replay(cfg: Config, uid: str, tmp_path: Path) -> None:
    base = f"test/{uid}/rec"
    sent: list[Received] = [
        (f"{base}/json", b'{"a":1,"b":[true,null]}', 1),
        (f"{base}/json", b'{"a": 1}', 1),  # valid JSON, not compact: kept as bytes
        (f"{base}/bin", b"\x00\x01\xfe\xff", 0),
        (f"{base}/empty", b"", 1),
        (f"{base}/json", '{"name":"温度 🌡"}'.encode(), 0),
        (f"{base}/json", b"null", 1),
        (f"{base}/bad-utf8", b'{"s":"\xff"}', 1),
        (f"{base}/gw-1/sys/events/down", b"1.5", 1),
    ]
    out = tmp_path / "recorded.jsonl"
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        recording = tasks.create_task(
            record(cfg.mqtt, out, topic=f"{base}/#", count=len(sent), progress=False, ready=ready)
        )
        async with asyncio.timeout(10):
            await ready.wait()
        async with mqtt.connect(cfg.mqtt, client_id=f"pub-{uid}", persistent=False) as pub:
            for topic, payload, qos in sent:
                await pub.publish(topic, payload, qos=qos)
        async with asyncio.timeout(10):
            assert await recording == len(sent)

    entries = [orjson.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert ["payload" in e for e in entries] == [True, False, False, False, True, True, False, True]
    assert entries[5]["payload"] is None
    assert "delay_ms" not in entries[0]
    assert all(isinstance(e["delay_ms"], int) and e["delay_ms"] >= 0 for e in entries[1:])

    recorded = load_fixture(out)
    assert [(m.topic, m.payload, m.qos) for m in recorded] == sent

    async with mqtt.connect(cfg.mqtt, client_id=f"sub-{uid}", persistent=False) as sub:
        await sub.subscribe(f"{base}/#", qos=1)
        assert await replay(cfg.mqtt, [out], progress=False) == len(sent)
        assert await _collect(sub, len(sent)) == sent


@services
async def test_record_stops_after_duration(cfg: Config, uid: str) -> None:
    out = io.StringIO()
    started = time.monotonic()
    count = await record(cfg.mqtt, out, topic=f"test/{uid}/quiet/#", duration=0.2, progress=True)
    assert count == 0
    assert out.getvalue() == ""
    assert time.monotonic() - started >= 0.2


@services
async def test_record_keeps_what_it_wrote_when_cancelled(cfg: Config, uid: str) -> None:
    out = io.StringIO()
    ready = asyncio.Event()
    recording = asyncio.create_task(
        record(cfg.mqtt, out, topic=f"test/{uid}/cancel/#", progress=False, ready=ready)
    )
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        async with mqtt.connect(cfg.mqtt, client_id=f"pub-{uid}", persistent=False) as pub:
            await pub.publish(f"test/{uid}/cancel/1", b'{"n":1}', qos=1)
            await pub.publish(f"test/{uid}/cancel/2", b"\x02", qos=1)
        async with asyncio.timeout(10):
            while out.getvalue().count("\n") < 2:
                await asyncio.sleep(0.01)
    finally:
        recording.cancel()
        with pytest.raises(asyncio.CancelledError):
            await recording
    assert [orjson.loads(line) for line in out.getvalue().splitlines()] == [
        {"topic": f"test/{uid}/cancel/1", "payload": {"n": 1}, "qos": 1},
        {
            "topic": f"test/{uid}/cancel/2",
            "payload_b64": "Ag==",
            "qos": 1,
            "delay_ms": orjson.loads(out.getvalue().splitlines()[1])["delay_ms"],
        },
    ]


# --------------------------------------------------------------------------------------
# The bundled fixtures


class _DeviceInfo(msgspec.Struct):
    node_id: str
    device_id: str


class _Reason(msgspec.Struct):
    node_id: str
    product_id: str
    error_code: str
    error_msg: str


class _AddResponse(msgspec.Struct):
    successful_devices: list[_DeviceInfo]
    failed_devices: list[_Reason]


class _Service(msgspec.Struct):
    service_id: str
    event_type: str
    event_id: str | None = None
    # Not ``msgspec.Raw | None``: msgspec then accepts only null.
    paras: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class _Event(msgspec.Struct):
    services: list[_Service] | None = None


_event = msgspec.json.Decoder(_Event)
_add_response = msgspec.json.Decoder(_AddResponse)


def _responses(message: FixtureMessage) -> list[tuple[str, _AddResponse]]:
    """(event_id, paras) of every add_sub_device_response, checked against the docs."""
    out = []
    for service in _event.decode(message.payload).services or []:
        if (service.service_id, service.event_type) == (
            "$sub_device_manager",
            "add_sub_device_response",
        ):
            assert service.event_id is not None
            assert bytes(service.paras) not in {b"", b"null"}
            out.append((service.event_id, _add_response.decode(service.paras)))
    return out


DEMO_GARBLED = b"\x00\x01garbled frame\xff"
"""The demo's one message that is not JSON."""

# file: (messages, successful children, failed children), redeliveries included.
COUNTS = {
    "add_notify.jsonl": (3, 1, 0),
    "delete_notify.jsonl": (3, 0, 0),
    "delete_response.jsonl": (4, 2, 0),
    "version_gap.jsonl": (5, 0, 0),
    "demo.jsonl": (10, 25, 7),
    "extra_fields.jsonl": (2, 3, 1),
    "fifty_children.jsonl": (1, 50, 0),
    "malformed.jsonl": (18, 0, 0),
    "multi_service.jsonl": (3, 3, 3),
    "null_optionals.jsonl": (2, 3, 1),
    "other_events.jsonl": (9, 0, 0),
    "seed_example.jsonl": (1, 1, 1),
    "several_responses.jsonl": (1, 6, 2),
    "unicode_names.jsonl": (3, 5, 2),
}


def test_every_fixture_is_counted() -> None:
    assert sorted(p.name for p in FIXTURE_FILES) == sorted(COUNTS)


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_loads_and_has_the_documented_counts(path: Path) -> None:
    messages = load_fixture(path)
    n, ok, failed = COUNTS[path.name]
    assert len(messages) == n
    if path.name == "malformed.jsonl":
        return
    messages = [m for m in messages if m.payload != DEMO_GARBLED]
    responses = [r for m in messages for _, r in _responses(m)]
    assert sum(len(r.successful_devices) for r in responses) == ok
    assert sum(len(r.failed_devices) for r in responses) == failed
    for message in messages:
        assert DOWN_TOPIC.match(message.topic), message.topic
        for event_id, _ in _responses(message):
            uuid.UUID(event_id)


def test_seed_example_matches_the_documentation() -> None:
    [message] = load_fixture(FIXTURES / "seed_example.jsonl")
    assert message.topic == "$oc/devices/gw-seed/sys/events/down"
    event = orjson.loads(message.payload)
    assert event["object_device_id"] == "{object_device_id}"
    [service] = event["services"]
    assert service["event_id"] == "40cc9ab1-3579-488c-95c6-c18941c99eb4"
    assert service["event_time"] == "20151212T121212Z"
    [ok] = service["paras"]["successful_devices"]
    assert ok["device_id"] == "c6b39067b0325db34663d3ef421a42f6_subdevice11"
    assert ok["parent_device_id"] is None
    assert ok["fw_version"] is None
    [failed] = service["paras"]["failed_devices"]
    assert failed == {
        "node_id": "subdevice12",
        "product_id": "c6b39067b0325db34663d3ef421a42f6",
        "error_code": "XXX",
        "error_msg": "XXXX",
    }


def test_malformed_fixture_explains_every_line() -> None:
    lines = [
        line for line in (FIXTURES / "malformed.jsonl").read_text("utf-8").splitlines() if line
    ]
    for before, line in itertools.pairwise(lines):
        if not line.startswith("#"):
            assert before.startswith("# dlq: "), line
    messages = load_fixture(FIXTURES / "malformed.jsonl")
    assert [DOWN_TOPIC.match(m.topic) is not None for m in messages] == [True] * 17 + [False]
    assert messages[2].payload == b'{"services": [{"service_id": "\xff"}]}'


def test_demo_fixture() -> None:
    messages = load_fixture(DEMO_FIXTURE)
    assert all(DOWN_TOPIC.match(m.topic) for m in messages)
    gateways = {m.topic.split("/")[2] for m in messages}
    assert gateways == {"gw-plant-a", "gw-plant-b", "gw-plant-c"}
    children: dict[tuple[str, str], list[str]] = {}
    for message in messages:
        gateway = message.topic.split("/")[2]
        try:
            responses = _responses(message)
        except msgspec.DecodeError:
            assert message.payload == DEMO_GARBLED
            continue
        for event_id, paras in responses:
            children[gateway, event_id] = [d.node_id for d in paras.successful_devices]
    assert len(children) == 6
    nodes = [n for ns in children.values() for n in ns]
    assert len(nodes) == len(set(nodes)) == 20
    assert {"unknown-sn-0001", "nogroup-sn-0001"} <= set(nodes)
    payloads = [m.payload for m in messages]
    assert len(payloads) - len(set(payloads)) == 1  # one identical redelivery
    assert all(0 <= m.delay_ms <= 50 for m in messages)


@services
async def test_cli_replays_the_bundled_demo(cfg: Config, uid: str) -> None:
    expected = [message.payload for message in load_fixture(DEMO_FIXTURE)]
    async with mqtt.connect(cfg.mqtt, client_id=f"sub-{uid}", persistent=False) as sub:
        await sub.subscribe(f"test/{uid}/#", qos=1)
        proc = await harness.start(
            sys.executable, "-m", "pipeline", "replay", "--demo", "--no-progress", "--no-delays",
            "--topic-prefix", f"test/{uid}/",
            env=worker_env(cfg), stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert (proc.returncode, out) == (0, f"published {len(expected)} messages\n".encode())
        got = []
        async with asyncio.timeout(10):
            async for message in sub.messages:
                got.append(message.payload)
                if len(got) == len(expected):
                    break
    assert got == expected


def test_cli_replay_needs_a_fixture() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "replay"], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stderr) == (
        2,
        "pipeline replay: give fixture FILEs, or --demo\n",
    )
