"""Routing and de-duplication as pure functions."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from pipeline.core.routing import Changes, Dedup, Memory, apply, route
from pipeline.errors import DecodeError
from pipeline.schemas import AddedChild, ChildState, DownEventRecord

NOW = "2026-12-04T18:00:00.000Z"

SEED_DEVICE = (
    b'{"device_id":"c6b39067b0325db34663d3ef421a42f6_subdevice11","name":"subdevice11",'
    b'"node_id":"subdevice11","unknown":{"kept":true},"extension_info":null}'
)


def record(event: bytes, gateway: str = "gw-1") -> bytes:
    return msgspec.json.encode(
        DownEventRecord(
            gateway_id=gateway,
            mqtt_topic=f"$oc/devices/{gateway}/sys/events/down",
            received_at="2026-11-22T06:30:00.123Z",
            event=msgspec.Raw(event),
        )
    )


def add(
    event_id: str,
    ok: list[bytes],
    failed: list[dict[str, str]],
    time: str | None = "20151212T121212Z",
) -> bytes:
    service = {
        "service_id": "$sub_device_manager",
        "event_type": "add_sub_device_response",
        "event_id": event_id,
    }
    if time is not None:
        service["event_time"] = time
    head = orjson.dumps(service)[:-1]
    ok_json = b"[" + b",".join(ok) + b"]"
    return (
        head
        + b',"paras":{"successful_devices":'
        + ok_json
        + b',"failed_devices":'
        + orjson.dumps(failed)
        + b"}}"
    )


def test_children_copied_byte_for_byte() -> None:
    reason = {"node_id": "subdevice12", "product_id": "p", "error_code": "XXX", "error_msg": "XXXX"}
    event = (
        b'{"services":['
        + add("ev-1", [SEED_DEVICE], [reason])
        + b',{"service_id":"$ota","event_type":"firmware_upgrade"}]}'
    )
    routed = route(record(event))
    assert routed.gateway_id == "gw-1"
    assert routed.skipped == [("$ota", "firmware_upgrade")]
    assert len(routed.events) == 1
    assert routed.events[0].event_id == "ev-1"
    outs = apply("gw-1", routed.events[0], Changes(Memory()), NOW).outs
    assert [(o.topic, o.key, o.value) for o in outs] == [
        (
            "added",
            b"c6b39067b0325db34663d3ef421a42f6_subdevice11",
            b'{"gateway_id":"gw-1","event_id":"ev-1","event_time":"2015-12-12T12:12:12.000Z",'
            b'"event_time_raw":"20151212T121212Z","source_event":"add_sub_device_response",'
            b'"version":null,"generation":1,"device":' + SEED_DEVICE + b"}",
        ),
        (
            "lifecycle",
            b"c6b39067b0325db34663d3ef421a42f6_subdevice11",
            b'{"device_id":"c6b39067b0325db34663d3ef421a42f6_subdevice11","gateway_id":"gw-1",'
            b'"state":"added","generation":1,"source_event":"add_sub_device_response",'
            b'"event_id":"ev-1","version":null,"changed_at":"' + NOW.encode() + b'",'
            b'"device":' + SEED_DEVICE + b"}",
        ),
        (
            "failed",
            b"subdevice12",
            b'{"gateway_id":"gw-1","event_id":"ev-1","event_time":"2015-12-12T12:12:12.000Z",'
            b'"event_time_raw":"20151212T121212Z","reason":' + orjson.dumps(reason) + b"}",
        ),
    ]
    # The records are what msgspec itself writes for them.
    added = msgspec.json.decode(outs[0].value, type=AddedChild)
    assert msgspec.json.encode(added) == outs[0].value
    state = msgspec.json.decode(outs[1].value, type=ChildState)
    assert msgspec.json.encode(state) == outs[1].value


@pytest.mark.parametrize(
    ("time", "normalised"),
    [
        ("2015-12-12T12:12:12Z", "2015-12-12T12:12:12.000Z"),
        ("20151212T121212Z", "2015-12-12T12:12:12.000Z"),
        ("2015-12-12T12:12:12.5Z", "2015-12-12T12:12:12.500Z"),
        ("2015-12-12T20:12:12+08:00", "2015-12-12T12:12:12.000Z"),
        ("2015-12-12T12:12:12", None),  # no zone: a guess
        ("20151312T121212Z", None),  # month 13
        ("not a time", None),
        ("", None),
        (None, None),
    ],
)
def test_event_time(time: str | None, normalised: str | None) -> None:
    routed = route(record(b'{"services":[' + add("e", [SEED_DEVICE], [], time) + b"]}"))
    value = orjson.loads(apply("gw-1", routed.events[0], Changes(Memory()), NOW).outs[0].value)
    assert value["event_time"] == normalised
    assert value["event_time_raw"] == time


def test_several_responses_and_unknown_services() -> None:
    event = (
        b'{"services":['
        + add("a", [SEED_DEVICE], [])
        + b","
        + add("b", [], [])
        + b',{"service_id":"$vendor","event_type":"new"}]}'
    )
    routed = route(record(event))
    assert [r.event_id for r in routed.events] == ["a", "b"]
    assert routed.skipped == [("other", "other")]


def test_not_a_record() -> None:
    with pytest.raises(DecodeError, match=r"^not a down-event record: "):
        route(b"garbage")


def test_dedup_window_and_bound() -> None:
    dedup = Dedup(window=10, max_entries=3)
    dedup.add(("gw", "a"), 1_000)
    assert dedup.seen(("gw", "a"), 5_000)
    assert not dedup.seen(("gw", "a"), 11_000)  # outside the window
    assert not dedup.seen(("gw2", "a"), 5_000)  # another gateway
    for i, key in enumerate("bcd"):
        dedup.add(("gw", key), 2_000 + i)
    assert len(dedup) == 3  # "a" evicted by the bound
    assert not dedup.seen(("gw", "a"), 5_000)
    dedup.add(("gw", "e"), 20_000)  # everything older than 10 s goes
    assert len(dedup) == 1
