"""Routing and de-duplication as pure functions."""

from __future__ import annotations

from typing import Any, Literal

import hypothesis
import msgspec
import orjson
import pytest
from hypothesis import strategies as st

from pipeline.core.routing import (
    Applied,
    Changes,
    Child,
    Dedup,
    DeviceUnknown,
    Gap,
    Memory,
    Versions,
    apply,
    route,
)
from pipeline.errors import DecodeError
from pipeline.schemas import AddedChild, ChildState, DeletedChild, DownEventRecord

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


# --------------------------------------------------------------------------------------
# Lifecycle: adds, deletes, versions and gaps decided against the router's memory


def device(n: int, gateway: str = "gw-1") -> bytes:
    return (
        b'{"parent_device_id":"' + gateway.encode() + b'","node_id":"n' + str(n).encode()
        + b'","device_id":"d' + str(n).encode() + b'","extra":{"kept":[1,2]}}'
    )  # fmt: skip


def notify(kind: str, version: int | None, *children: int) -> bytes:
    paras: dict[str, object] = {"devices": [orjson.loads(device(n)) for n in children]}
    if version is not None:
        paras["version"] = version
    service = {
        "service_id": "$sub_device_manager",
        "event_type": f"{kind}_sub_device_notify",
        "event_time": "20241202T130000Z",
        "paras": paras,
    }
    return orjson.dumps(service)


def delete_response(event_id: str, *children: int) -> bytes:
    service = {
        "service_id": "$sub_device_manager",
        "event_type": "delete_sub_device_response",
        "event_id": event_id,
        "paras": {"successful_devices": [f"d{n}" for n in children], "failed_devices": []},
    }
    return orjson.dumps(service)


def feed(memory: Memory, *services: bytes, gateway: str = "gw-1") -> list[Applied]:
    """Route one record holding ``services`` and apply each event, then commit."""
    routed = route(record(b'{"services":[' + b",".join(services) + b"]}", gateway))
    changes = Changes(memory)
    applied = [apply(routed.gateway_id, event, changes, NOW) for event in routed.events]
    changes.commit()
    return applied


def outs(applied: list[Applied], topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(o.value) for a in applied for o in a.outs if o.topic == topic]


def test_notify_children_are_added_once() -> None:
    memory = Memory()
    first = feed(memory, add("ev-1", [device(1)], []), notify("add", 7, 1, 2))
    added = outs(first, "added")
    assert [(a["source_event"], a["version"], a["generation"]) for a in added] == [
        ("add_sub_device_response", None, 1),
        ("add_sub_device_notify", 7, 1),  # d2 only: d1 was announced by the response
    ]
    assert [orjson.loads(device(1)), orjson.loads(device(2))] == [a["device"] for a in added]
    assert added[1]["event_id"] is None
    assert first[1].counts == {"added": 1, "duplicate": 1}
    # A notify redelivered (same version): stale, nothing; the response again: duplicates.
    again = feed(memory, notify("add", 7, 1, 2), add("ev-1", [device(1)], []))
    assert outs(again, "added") == []
    assert again[0].counts == {"stale": 1}
    assert again[1].counts == {"duplicate": 1}


def test_deletes_carry_the_last_device_info_and_generation() -> None:
    memory = Memory()
    feed(memory, notify("add", 1, 1, 2))
    applied = feed(memory, notify("delete", 2, 1), delete_response("del-1", 2, 3))
    deleted = outs(applied, "deleted")
    assert [
        (d["device_id"], d["source_event"], d["event_id"], d["version"], d["generation"])
        for d in deleted
    ] == [
        ("d1", "delete_sub_device_notify", None, 2, 2),
        ("d2", "delete_sub_device_response", "del-1", None, 2),
        ("d3", "delete_sub_device_response", "del-1", None, 1),  # never seen added
    ]
    assert [d["device"] for d in deleted] == [
        orjson.loads(device(1)), orjson.loads(device(2)), None,
    ]  # fmt: skip
    states = outs(applied, "lifecycle")
    assert [(s["device_id"], s["state"], s["generation"]) for s in states] == [
        ("d1", "deleted", 2), ("d2", "deleted", 2), ("d3", "deleted", 1),
    ]  # fmt: skip
    # Deleted twice: a duplicate.
    assert feed(memory, delete_response("del-2", 1))[0].counts == {"duplicate": 1}
    # The lifecycle and deleted records decode as the schemas say, and encode back.
    for o in (o for a in applied for o in a.outs):
        shape = {"deleted": DeletedChild, "lifecycle": ChildState}[o.topic]
        assert msgspec.json.encode(msgspec.json.decode(o.value, type=shape)) == o.value


def test_records_of_children_of_different_generations_in_one_event() -> None:
    # apply encodes what the children of an event share once per generation; each record
    # is still exactly what msgspec writes for it, whatever the device_id holds.
    odd = '{"device_id":"d\\"q\u00e9","node_id":"n9"}'.encode()
    memory = Memory()
    feed(memory, add("ev-1", [device(2)], []))
    feed(memory, delete_response("del-1", 2))
    applied = feed(memory, add("ev-2", [device(1), device(2), odd], []))
    values = [(o.topic, o.value) for a in applied for o in a.outs]
    assert [(t, orjson.loads(v)["generation"]) for t, v in values] == [
        ("added", 1), ("lifecycle", 1), ("added", 3), ("lifecycle", 3),
        ("added", 1), ("lifecycle", 1),
    ]  # fmt: skip
    assert orjson.loads(values[-1][1])["device_id"] == 'd"q\u00e9'
    for topic, value in values:
        shape = {"added": AddedChild, "lifecycle": ChildState}[topic]
        assert msgspec.json.encode(msgspec.json.decode(value, type=shape)) == value


def test_add_delete_add_counts_generations() -> None:
    memory = Memory()
    applied = feed(
        memory,
        add("a-1", [device(1)], []),
        delete_response("d-1", 1),
        notify("add", 4, 1),
    )
    kinds = [(o.topic, orjson.loads(o.value)["generation"]) for a in applied for o in a.outs]
    assert kinds == [
        ("added", 1), ("lifecycle", 1), ("deleted", 2), ("lifecycle", 2),
        ("added", 3), ("lifecycle", 3),
    ]  # fmt: skip


def test_stale_and_duplicate_versions_are_skipped() -> None:
    memory = Memory()
    feed(memory, notify("add", 5, 1))
    for stale in (5, 4, 1):
        applied = feed(memory, notify("add", stale, 9))
        assert applied[0].outs == []
        assert applied[0].counts == {"stale": 1}
    assert feed(memory, notify("delete", 6, 1))[0].counts == {"deleted": 1}
    assert memory.versions["gw-1"] == Versions(last=6)


def test_a_gap_asks_for_a_sync_and_is_filled() -> None:
    memory = Memory()
    feed(memory, notify("add", 3, 1))
    applied = feed(memory, notify("add", 7, 2))  # 4, 5 and 6 never came
    assert applied[0].gap == Gap("gw-1", 4, 6, 3)
    assert outs(applied, "sync_requests") == [
        {"gateway_id": "gw-1", "version": 3, "missing_from": 4, "missing_to": 6,
         "detected_at": NOW},
    ]  # fmt: skip
    assert [o.key for o in applied[0].outs if o.topic == "sync_requests"] == [b"gw-1"]
    assert outs(applied, "added")[0]["version"] == 7  # applied
    assert memory.open_gaps() == {"gw-1": [(4, 6)]}
    # A second gap: the sync starts before the first one still open.
    assert feed(memory, notify("add", 10, 3))[0].gap == Gap("gw-1", 8, 9, 3)
    assert memory.open_gaps() == {"gw-1": [(4, 6), (8, 9)]}
    # The sync answer fills them; a child a later version already decided is left alone.
    feed(memory, notify("delete", 11, 2))
    filled = feed(memory, notify("add", 5, 2, 4))
    assert filled[0].counts == {"filled": 1, "superseded": 1, "added": 1}
    assert [(a["device"]["device_id"], a["generation"]) for a in outs(filled, "added")] == [
        ("d4", 1)
    ]
    assert memory.open_gaps() == {"gw-1": [(4, 4), (6, 6), (8, 9)]}
    for version in (4, 6, 8, 9):
        feed(memory, notify("add", version))
    assert memory.open_gaps() == {}
    assert memory.versions["gw-1"] == Versions(last=11)


def test_gateways_are_sequenced_apart() -> None:
    memory = Memory()
    feed(memory, notify("add", 1, 1), gateway="gw-a")
    assert feed(memory, notify("add", 1, 1), gateway="gw-b")[0].counts == {"added": 1}
    assert feed(memory, notify("add", 9, 2), gateway="gw-b")[0].gap == Gap("gw-b", 2, 8, 1)
    assert memory.open_gaps() == {"gw-b": [(2, 8)]}


def test_invalid_child_events_are_refused() -> None:
    no_version = notify("add", None, 1)
    with pytest.raises(DecodeError, match=r"add_sub_device_notify without paras\.version"):
        route(record(b'{"services":[' + no_version + b"]}"))
    no_id = delete_response("x", 1).replace(b'"event_id":"x",', b"")
    with pytest.raises(DecodeError, match="delete_sub_device_response without event_id"):
        route(record(b'{"services":[' + no_id + b"]}"))
    with pytest.raises(
        DecodeError,
        match=r"^services\[0\] \(delete_sub_device_notify\): Expected `array`, got `int` - "
        r"at `\$\.devices`$",
    ):
        route(
            record(
                b'{"services":['
                + notify("delete", 3).replace(b'"devices":[]', b'"devices":7')
                + b"]}"
            )
        )


_events = st.lists(
    st.tuples(
        st.sampled_from(["add-notify", "delete-notify", "add-response", "delete-response"]),
        st.integers(1, 12),  # version
        st.lists(st.integers(1, 5), min_size=1, max_size=3, unique=True),
    ),
    max_size=25,
)


@hypothesis.given(_events)
def test_memory_rebuilt_from_its_records_decides_alike(
    events: list[tuple[str, int, list[int]]],
) -> None:
    """What a router restarted from router_state decides is what the first one would.

    The memory records do not hold DeviceInfos: the restarted router reads those it needs
    from the lifecycle records written beside them.
    """
    live, persisted, lifecycle = Memory(), [], []
    for i, (kind, version, children) in enumerate(events):
        if kind.endswith("notify"):
            service = notify(kind.split("-")[0], version, *children)
        elif kind == "add-response":
            service = add(f"e{i}", [device(n) for n in children], [])
        else:
            service = delete_response(f"e{i}", *children)
        routed = route(record(b'{"services":[' + service + b"]}"))
        changes = Changes(live)
        for event in routed.events:
            applied = apply("gw-1", event, changes, NOW)
            lifecycle += [(o.key, o.value) for o in applied.outs if o.topic == "lifecycle"]
        persisted += changes.records()
        changes.commit()
    rebuilt = Memory()
    for key, value in persisted:
        assert rebuilt.learn(key, value)
    assert (rebuilt.versions, rebuilt.children()) == (live.versions, live.children())
    wanted = rebuilt.unknown_devices()
    assert set(wanted) == {k for k, c in live.children().items() if c.state == "added"}
    for key, value in lifecycle:
        rebuilt.learn_device(key, value, wanted)
    assert rebuilt.settle(wanted) == []
    assert {k: rebuilt.device(k) for k in wanted} == {k: live.device(k) for k in wanted}
    # Deleting every child: the same records from both.
    every = delete_response("del", *range(1, 6))
    assert [(o.topic, o.key, o.value) for a in feed(rebuilt, every) for o in a.outs] == [
        (o.topic, o.key, o.value) for a in feed(live, every) for o in a.outs
    ]
    # Generations only grow, one per change of state, and the state alternates.
    for child in live.children().values():
        assert child.generation >= 1


def test_memory_records_are_compact() -> None:
    """A child's memory record holds its state, generation and version, no DeviceInfo."""
    changes = Changes(Memory())
    routed = route(record(b'{"services":[' + notify("add", 4, 1) + b"]}"))
    apply("gw-1", routed.events[0], changes, NOW)
    assert dict(changes.records()) == {
        b"v/gw-1": b'{"last":4,"missing":[]}',
        b"c/gw-1/d1": b'{"generation":1,"state":"added","version":4}',
    }


@hypothesis.given(
    st.integers(0, 2**40),
    st.sampled_from(["added", "deleted"]),
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.integers(-(10**30), 10**30),
    st.none() | st.binary(max_size=40),
)
def test_a_child_is_remembered_as_it_was_put(
    generation: int, state: Literal["added", "deleted"], version: int | None, info: bytes | None
) -> None:
    """Packed in memory and read back: the same state, and the DeviceInfo of an added child.

    Any version the decoder takes, a Java long or not; a deleted child keeps no DeviceInfo
    (a delete of it is a duplicate, an add brings its own).
    """
    memory, key = Memory(), ("gw-1", "d1")
    child = Child(generation=generation, state=state, version=version)
    memory.put(key, child, info)
    assert memory.child(key) == child
    assert memory.device(key) == (info if state == "added" else None)
    assert memory.children() == {key: child}
    assert memory.unknown_devices() == (
        {key: generation} if state == "added" and info is None else {}
    )
    assert (memory.child(("gw-1", "d2")), memory.device(("gw-2", "d1"))) == (None, None)


def test_an_earlier_routers_memory_records_are_read_with_their_device_info() -> None:
    """After an upgrade: records holding the DeviceInfo (as routers wrote them before)."""
    memory = Memory()
    assert memory.learn(
        b"c/gw-1/d1", b'{"generation":1,"state":"added","version":3,"device":' + device(1) + b"}"
    )
    assert memory.learn(
        b"c/gw-1/d2", b'{"generation":2,"state":"deleted","version":null,"device":null}'
    )
    assert memory.unknown_devices() == {}  # nothing to look up
    applied = feed(memory, delete_response("del-1", 1, 2), add("ev-1", [device(2)], []))
    assert [(d["device_id"], d["generation"], d["device"]) for d in outs(applied, "deleted")] == [
        ("d1", 2, orjson.loads(device(1))),
    ]
    assert applied[0].counts == {"deleted": 1, "duplicate": 1}
    assert [(a["generation"], a["device"]) for a in outs(applied, "added")] == [
        (3, orjson.loads(device(2))),
    ]


def test_a_record_read_back_replaces_what_an_earlier_one_said() -> None:
    """A compact record after an earlier router's of the same child: its DeviceInfo is gone.

    router_state not yet compacted holds both (the child deleted and added again in one
    transaction since): the DeviceInfo of generation 1 is not generation 3's, so it is
    looked up in lifecycle instead of carried by the next delete.
    """
    memory = Memory()
    assert memory.learn(
        b"c/gw-1/d1", b'{"generation":1,"state":"added","version":null,"device":' + device(1) + b"}"
    )
    assert memory.learn(b"c/gw-1/d1", b'{"generation":3,"state":"added","version":null}')
    assert memory.unknown_devices() == {("gw-1", "d1"): 3}
    assert memory.device(("gw-1", "d1")) is None


@pytest.mark.parametrize("generation", [-1, 2**62 + 1, 2**63, 2**64])
def test_a_generation_no_router_writes_is_not_read(generation: int) -> None:
    """Generations count changes from 0; one beyond 2**62 would not pack (corrupt input)."""
    record = b'{"generation":%d,"state":"added","version":null}' % generation
    assert not Memory().learn(b"c/gw-1/d1", record)


def test_a_delete_asks_for_a_device_info_the_memory_lacks() -> None:
    """Read back from compact records, a child's DeviceInfo comes from its lifecycle record."""
    live = Memory()
    lifecycle = [
        (o.key, o.value)
        for a in feed(live, notify("add", 1, 1, 2, 3)) + feed(live, delete_response("x", 3))
        for o in a.outs
        if o.topic == "lifecycle"
    ]
    rebuilt = Memory()
    for (gateway, device_id), child in live.children().items():  # the compact records
        assert rebuilt.learn(f"c/{gateway}/{device_id}".encode(), msgspec.json.encode(child))
    with pytest.raises(DeviceUnknown) as caught:
        feed(rebuilt, notify("delete", 2, 1))
    assert caught.value.key == ("gw-1", "d1")
    wanted = rebuilt.unknown_devices()
    assert wanted == {("gw-1", "d1"): 1, ("gw-1", "d2"): 1}  # d3 is deleted: not needed
    # d2's lifecycle record is another gateway's now (the same device_id added there),
    # and compaction kept only that one.
    moved = feed(Memory(), notify("add", 9, 2), gateway="gw-2")
    lifecycle += [(o.key, o.value) for a in moved for o in a.outs if o.topic == "lifecycle"]
    compacted = dict(lifecycle)
    found = [rebuilt.learn_device(key, value, wanted) for key, value in compacted.items()]
    assert found == [True, False, False]
    assert rebuilt.settle(wanted) == [("gw-1", "d2")]
    deleted = outs(feed(rebuilt, notify("delete", 2, 1, 2)), "deleted")
    assert [(d["device_id"], d["generation"], d["device"]) for d in deleted] == [
        ("d1", 2, orjson.loads(device(1))),
        ("d2", 2, None),  # its DeviceInfo is lost: null, as for a child never seen added
    ]


KINDS = [
    "add_sub_device_response",
    "add_sub_device_notify",
    "delete_sub_device_response",
    "delete_sub_device_notify",
]
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_paras = st.fixed_dictionaries(
    {},
    optional={
        "devices": st.lists(
            st.fixed_dictionaries({}, optional={"device_id": st.text(max_size=5) | _json}) | _json,
            max_size=3,
        ),
        "version": st.integers(-3, 3) | _json,
        "successful_devices": st.lists(st.text(max_size=5) | _json, max_size=3),
        "failed_devices": st.lists(_json, max_size=2),
    },
)


@hypothesis.given(
    st.lists(
        st.tuples(
            st.sampled_from(KINDS),
            st.none() | st.text(max_size=4),
            _paras | _json,
        ),
        max_size=4,
    )
)
def test_any_child_event_is_routed_or_refused_with_a_reason(
    services: list[tuple[str, str | None, Any]],
) -> None:
    """Whatever a child event's paras hold: its records, or a DecodeError; never a crash."""
    body = [
        {"service_id": "$sub_device_manager", "event_type": kind, "paras": paras}
        | ({"event_id": event_id} if event_id is not None else {})
        for kind, event_id, paras in services
    ]
    try:
        routed = route(record(orjson.dumps({"services": body})))
    except DecodeError as exc:
        assert str(exc)
        return
    changes = Changes(Memory())
    for event in routed.events:
        for out in apply("gw-1", event, changes, NOW).outs:
            orjson.loads(out.value)  # every record is JSON
