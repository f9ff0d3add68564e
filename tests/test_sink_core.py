"""The sink's pure parts: mapping, the offset tracker and the breaker."""

from __future__ import annotations

import asyncio

import msgspec
import orjson
import pytest
from aiokafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError, MappingError
from pipeline.mapping import Mapper
from pipeline.schemas import AddedChild
from pipeline.sink import Breaker, OffsetTracker


def child(**device: object) -> bytes:
    base = {"node_id": "node-1", "device_id": "prod_node-1", "product_id": "prod"}
    return msgspec.json.encode(
        AddedChild(
            gateway_id="gw",
            event_id="ev",
            event_time=None,
            event_time_raw=None,
            device=msgspec.Raw(orjson.dumps({**base, **device})),
        )
    )


def mapper(**kw: object) -> Mapper:
    args: dict[str, object] = {
        "sn_from": "node_id",
        "org_id": "o1",
        "org_overrides": {},
        "device_data": {},
    }
    return Mapper(**(args | kw))  # type: ignore[arg-type]


def test_default_mapping() -> None:
    mapped = mapper().map(child())
    assert (mapped.sn, mapped.org_id) == ("node-1", "o1")
    assert msgspec.json.encode(mapped.request) == b'{"sn":"node-1"}'  # deviceData left out


def test_sn_device_id_template_org_override_and_device_data() -> None:
    m = mapper(
        sn_from="{product_id}-{extension_info.serial}",
        org_overrides={"prod": "o-prod"},
        device_data={"deviceName": "name", "capacity": "extension_info.kw", "absent": "model"},
    )
    mapped = m.map(child(name="Inverter 1", extension_info={"serial": "S9", "kw": 12.5}))
    assert (mapped.sn, mapped.org_id) == ("prod-S9", "o-prod")
    assert msgspec.json.encode(mapped.request) == (
        b'{"sn":"prod-S9","deviceData":{"deviceName":"Inverter 1","capacity":12.5}}'
    )
    assert mapper(sn_from="device_id").map(child()).sn == "prod_node-1"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "not an added-child record: JSON is malformed: invalid character (byte 4)"),
        (child(node_id=""), "sn: node_id is empty (sink.sn_from = 'node_id')"),
    ],
)
def test_unmappable(value: bytes, reason: str) -> None:
    with pytest.raises(MappingError) as info:
        mapper().map(value)
    assert str(info.value) == reason


def test_unmappable_device_data_and_template() -> None:
    with pytest.raises(
        MappingError, match=r"^deviceData.x: extension_info.obj is dict; DPS master data"
    ):
        mapper(device_data={"x": "extension_info.obj"}).map(child(extension_info={"obj": {"a": 1}}))
    with pytest.raises(MappingError, match=r"^sn: extension_info.serial is empty"):
        mapper(sn_from="{extension_info.serial}").map(child())


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sn_from": "serial"}, "config key sink.sn_from: 'serial' is neither a DeviceInfo field"),
        ({"sn_from": "{nope}-x"}, "config key sink.sn_from: 'nope' is neither"),
        ({"sn_from": "{"}, "config key sink.sn_from: not a valid template"),
        (
            {"device_data": {"a": "extension_info."}},
            "config key sink.device_data.a: 'extension_info.' is",
        ),
        ({"org_id": ""}, "config key sink.org_id: must not be empty"),
    ],
)
def test_bad_mapping_config(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        mapper(**kw)
    assert str(info.value).startswith(message)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=100)
    | st.builds(
        lambda d: child(**d),
        st.dictionaries(
            st.sampled_from(["node_id", "name", "extension_info", "product_id"]),
            st.none()
            | st.text()
            | st.integers(-(2**63), 2**63 - 1)
            | st.dictionaries(st.text(), st.text()),
        ),
    )
)
def test_mapping_never_raises_anything_else(value: bytes) -> None:
    m = mapper(sn_from="{product_id}/{node_id}", device_data={"n": "name", "e": "extension_info.k"})
    try:
        m.map(value)
    except MappingError as exc:
        assert str(exc)


def test_offset_tracker_commits_only_contiguous_outcomes() -> None:
    t = OffsetTracker()
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    for offset in (5, 6, 7):
        t.start(p0, offset)
    t.start(p1, 0)
    t.done(p0, 7)
    assert t.take_commits() == {}  # 5 and 6 are still in flight
    t.done(p0, 5)
    assert t.take_commits() == {p0: 6}
    t.done(p0, 6)
    t.done(p1, 0)
    assert t.take_commits() == {p0: 8, p1: 1}
    assert t.take_commits() == {}
    assert t.in_flight() == 0
    t.start(p0, 8)
    t.forget([p0])
    t.done(p0, 8)  # revoked meanwhile: ignored
    assert t.take_commits() == {}


async def test_breaker_single_probe_while_open() -> None:
    changes: list[bool] = []
    breaker = Breaker(0.05, 0.1, changes.append)
    assert await breaker.acquire() is False  # closed: everyone goes
    breaker.release(False, failed=True)
    assert changes == [True]
    assert breaker.open
    probe = await breaker.acquire()
    assert probe is True
    waiter = asyncio.create_task(breaker.acquire())
    await asyncio.sleep(0.2)
    assert not waiter.done()  # only the probe may call while open
    breaker.release(probe, failed=False)
    assert await asyncio.wait_for(waiter, 1) is False
    assert changes == [True, False]
    assert not breaker.open


def test_breaker_delay_honours_retry_after() -> None:
    breaker = Breaker(0.5, 30, lambda _: None)
    assert 0.25 <= breaker.delay(1, None) <= 0.5
    assert breaker.delay(1, 7.0) == 7.0
    assert 15 <= breaker.delay(20, None) <= 30
