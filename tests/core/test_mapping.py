"""Mapping an added child to a DPS request: sn, orgId, deviceData (pure)."""

from __future__ import annotations

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.mapping import Mapper, check_settings
from pipeline.errors import ConfigError, MappingError
from pipeline.schemas import AddedChild


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
        ({"sn_from": "{}-{node_id}"}, "config key sink.sn_from: '{}' names no field"),
        (
            {"sn_from": "{node_id:>12}"},
            "config key sink.sn_from: {node_id...}: format specs and conversions are not supported",
        ),
        (
            {"sn_from": "{node_id!r}"},
            "config key sink.sn_from: {node_id...}: format specs and conversions are not supported",
        ),
    ],
)
def test_bad_mapping_config(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        mapper(**kw)
    assert str(info.value).startswith(message)
    # What the configuration checks at load: the same rules, without a Mapper.
    rules = {"sn_from": "node_id", "org_id": "o1", "device_data": {}} | kw
    with pytest.raises(ConfigError) as checked:
        check_settings(**rules)  # type: ignore[arg-type]
    assert str(checked.value) == str(info.value)


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
