"""Ingest and router through the real Mosquitto and Kafka, driven by replay fixtures."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline.config import Config
from pipeline.ops.server import Health
from pipeline.schemas import DownEventRecord
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.tools.replay import load_fixture, replay
from tests.harness import FIXTURES, read_topic, running, wait_check

pytestmark = pytest.mark.services


@dataclasses.dataclass
class Expected:
    """What the router should write for a fixture: (key, child JSON) sorted by key."""

    added: list[tuple[bytes, Any]] = dataclasses.field(default_factory=list)
    failed: list[tuple[bytes, Any]] = dataclasses.field(default_factory=list)
    deleted: list[tuple[bytes, Any]] = dataclasses.field(default_factory=list)
    sync_requests: int = 0


def oracle(path: Path) -> Expected:  # noqa: C901, PLR0912 - one loop reads best here
    """The router's decisions worked out again from plain JSON parsing: each child added
    or deleted once per change of state, responses de-duplicated by event_id,
    notifications by their gateway's version."""
    out = Expected()
    seen: set[tuple[str, str]] = set()
    state: dict[tuple[str, str], tuple[str, Any]] = {}
    versions: dict[str, tuple[int, set[int]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        entry = json.loads(line)
        payload = (
            entry["payload"]
            if "payload" in entry
            else json.loads(base64.b64decode(entry["payload_b64"]))
        )
        gateway = entry["topic"].split("/")[2]
        for service in payload.get("services") or []:
            kind = service.get("event_type")
            if service.get("service_id") != MANAGER or kind not in KINDS:
                continue
            paras = service["paras"]
            if "event_id" in service:  # a response
                if (gateway, service["event_id"]) in seen:
                    continue  # a redelivery
                seen.add((gateway, service["event_id"]))
            else:  # a notification
                version = paras["version"]
                last, missing = versions.get(gateway, (version - 1, set()))
                if version > last + 1:
                    out.sync_requests += 1
                    missing |= set(range(last + 1, version))
                elif version <= last and version not in missing:
                    continue  # stale
                missing.discard(version)
                versions[gateway] = (max(last, version), missing)
            if kind == "add_sub_device_response":
                out.failed += [(r["node_id"].encode(), r) for r in paras["failed_devices"]]
            if kind.startswith("add"):
                devices = paras.get("successful_devices", paras.get("devices"))
                for d in devices:
                    if state.get((gateway, d["device_id"]), ("",))[0] != "added":
                        state[gateway, d["device_id"]] = ("added", d)
                        out.added.append((d["device_id"].encode(), d))
                continue
            ids = paras.get("successful_devices") or [d["device_id"] for d in paras["devices"]]
            for device_id in ids:
                before, device = state.get((gateway, device_id), ("", None))
                if before != "deleted":
                    state[gateway, device_id] = ("deleted", device)
                    out.deleted.append((device_id.encode(), device))
    for field in ("added", "failed", "deleted"):
        getattr(out, field).sort(key=lambda kv: kv[0])
    return out


MANAGER = "$sub_device_manager"
KINDS = {
    "add_sub_device_response",
    "add_sub_device_notify",
    "delete_sub_device_response",
    "delete_sub_device_notify",
}


def children(records: list[Any], field: str) -> list[tuple[bytes, object]]:
    return sorted(((r.key, json.loads(r.value)[field]) for r in records), key=lambda kv: kv[0])


GOOD = [
    "seed_example.jsonl",
    "multi_service.jsonl",
    "several_responses.jsonl",
    "fifty_children.jsonl",
    "unicode_names.jsonl",
    "null_optionals.jsonl",
    "extra_fields.jsonl",
    "other_events.jsonl",
    "add_notify.jsonl",
    "delete_notify.jsonl",
    "delete_response.jsonl",
    "version_gap.jsonl",
]


@pytest.mark.parametrize("name", GOOD)
async def test_fixture_through_ingest_and_router(cfg: Config, uid: str, name: str) -> None:
    path = FIXTURES / name
    messages = load_fixture(path)
    expected = oracle(path)
    health = Health()
    async with running(Ingest(cfg), health) as task, running(Router(cfg)):
        await wait_check(health, "ingest.mqtt", task)
        assert await replay(cfg.mqtt, [path], progress=False) == len(messages)
        topics = cfg.kafka.topics
        landed = await read_topic(cfg.kafka, topics.down_events, expect=len(messages))
        got_added = await read_topic(cfg.kafka, topics.added, expect=len(expected.added))
        got_failed = await read_topic(cfg.kafka, topics.failed, expect=len(expected.failed))
        got_deleted = await read_topic(cfg.kafka, topics.deleted, expect=len(expected.deleted))
        syncs = await read_topic(cfg.kafka, topics.sync_requests, expect=expected.sync_requests)
        lifecycle = await read_topic(
            cfg.kafka, topics.lifecycle, expect=len(expected.added) + len(expected.deleted)
        )
    dlq = await read_topic(cfg.kafka, topics.down_events_dlq, expect=0)
    assert dlq == []
    # Every message landed once, byte for byte, keyed by its gateway.
    decoded = [msgspec.json.decode(r.value, type=DownEventRecord) for r in landed]
    assert sorted(
        (r.key, bytes(d.event), d.mqtt_topic) for r, d in zip(landed, decoded, strict=True)
    ) == sorted((m.topic.split("/")[2].encode(), m.payload, m.topic) for m in messages)
    assert children(got_added, "device") == expected.added
    assert children(got_failed, "reason") == expected.failed
    assert children(got_deleted, "device") == expected.deleted
    assert len(syncs) == expected.sync_requests
    assert len(lifecycle) == len(expected.added) + len(expected.deleted)
    for record in got_added + got_failed:
        value = json.loads(record.value)
        assert set(value) >= {"gateway_id", "event_id", "event_time", "event_time_raw"}


async def test_seed_example_exact_records(cfg: Config, uid: str) -> None:
    health = Health()
    async with running(Ingest(cfg), health) as task, running(Router(cfg)):
        await wait_check(health, "ingest.mqtt", task)
        await replay(cfg.mqtt, [FIXTURES / "seed_example.jsonl"], progress=False)
        added = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=1)
        failed = await read_topic(cfg.kafka, cfg.kafka.topics.failed, expect=1)
    assert [r.key for r in added] == [b"c6b39067b0325db34663d3ef421a42f6_subdevice11"]
    value = json.loads(added[0].value)
    assert {k: value[k] for k in ("gateway_id", "event_id", "event_time", "event_time_raw")} == {
        "gateway_id": "gw-seed",
        "event_id": "40cc9ab1-3579-488c-95c6-c18941c99eb4",
        "event_time": "2015-12-12T12:12:12.000Z",
        "event_time_raw": "20151212T121212Z",
    }
    assert value["device"]["node_id"] == "subdevice11"
    assert value["device"]["parent_device_id"] is None
    assert [r.key for r in failed] == [b"subdevice12"]
    assert json.loads(failed[0].value)["reason"] == {
        "node_id": "subdevice12",
        "product_id": "c6b39067b0325db34663d3ef421a42f6",
        "error_code": "XXX",
        "error_msg": "XXXX",
    }


MALFORMED_REASONS = [
    "payload is not valid JSON (invalid character at byte 4)",
    "payload is empty",
    "payload is not valid UTF-8 (byte 30: invalid start byte)",
    "payload is not a JSON object (got an array)",
    "payload is not a JSON object (got a string)",
    "payload is not a JSON object (got null)",
    "services[0].event_id: missing (mandatory for add_sub_device_response)",
    "services[0].paras: missing (mandatory for add_sub_device_response)",
    "services[0].paras: missing (mandatory for add_sub_device_response)",
    "services[0].paras.successful_devices: expected `array`, got `object`",
    "services[0].paras.failed_devices: missing required field",
    "services[0].paras.successful_devices[0].node_id: missing required field",
    "services[0].paras.successful_devices[0].device_id: expected `str`, got `int`",
    "services[0].paras.failed_devices[0].error_code: missing required field",
    "services[0].paras.failed_devices[0].error_code: expected `str`, got `int`",
    "services: expected `array | null`, got `object`",
    "services[0].service_id: missing required field",
    (
        "MQTT topic '$oc/devices/gw-9/sys/messages/down' does not match "
        "$oc/devices/{device_id}/sys/events/down"
    ),
]


async def test_malformed_go_to_dlq_with_reasons(cfg: Config, uid: str) -> None:
    path = FIXTURES / "malformed.jsonl"
    messages = load_fixture(path)
    assert len(messages) == len(MALFORMED_REASONS)
    cfg = msgspec.structs.replace(
        cfg, mqtt=msgspec.structs.replace(cfg.mqtt, topic="$oc/devices/+/sys/#")
    )
    health = Health()
    async with running(Ingest(cfg), health) as task:
        await wait_check(health, "ingest.mqtt", task)
        await replay(cfg.mqtt, [path], progress=False)
        dlq = await read_topic(cfg.kafka, cfg.kafka.topics.down_events_dlq, expect=len(messages))
    landed = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=0)
    assert landed == []
    got = sorted(
        (r.value, dict(r.headers)["error"].decode(), dict(r.headers)["mqtt-topic"].decode(), r.key)
        for r in dlq
    )
    expected = sorted(
        (
            m.payload,
            reason.replace("{uid}", uid),
            m.topic,
            None if "messages/down" in m.topic else m.topic.split("/")[2].encode(),
        )
        for m, reason in zip(messages, MALFORMED_REASONS, strict=True)
    )
    assert got == expected
    assert all(dict(r.headers)["received-at"].decode().endswith("Z") for r in dlq)
