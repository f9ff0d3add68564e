"""The decoder: every input becomes a DownEvent or a DecodeError naming the field at fault."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.decode import decode_down, gateway_from_topic
from pipeline.errors import DecodeError

ADD = {"service_id": "$sub_device_manager", "event_type": "add_sub_device_response"}


def add_event(paras: object, **service: object) -> bytes:
    return orjson.dumps({"services": [{**ADD, "event_id": "e1", **service, "paras": paras}]})


GOOD_DEVICE = {"node_id": "n1", "device_id": "p_n1"}
GOOD_REASON = {"node_id": "n2", "product_id": "p", "error_code": "E", "error_msg": "m"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "payload is empty"),
        (b" \n", "payload is only whitespace"),
        (b"not json", "payload is not valid JSON (invalid character at byte 4)"),
        (b'{"a": 1', "payload is not valid JSON (it ends before the JSON value does)"),
        (b'{"a": 1,}', "payload is not valid JSON (trailing comma in object at byte 8)"),
        (
            b"\xef\xbb\xbf{}",
            "payload starts with a UTF-8 byte-order mark, which JSON does not allow",
        ),
        (b"\xff\xfe{\x00}\x00", "payload is UTF-16 (little-endian byte-order mark), not UTF-8"),
        (b'{"v": NaN}', "payload contains NaN or Infinity, which JSON does not allow (byte 6)"),
        (
            b'{"v": -Infinity}',
            "payload contains NaN or Infinity, which JSON does not allow (byte 7)",
        ),
        (b'{"services": []} {}', "payload has data after the JSON value (from byte 17)"),
        (b'{"\xff": 1}', "payload is not valid UTF-8 (byte 2: invalid start byte)"),
        (
            b'{"services": [{"service_id": "a", "event_type": "b", "paras": '
            + b"[" * 5000
            + b"]" * 5000
            + b"}]}",
            "payload nests deeper than the decoder allows (about 1,000 levels)",
        ),
        (
            orjson.dumps(
                {
                    "services": [
                        {
                            **ADD,
                            "event_id": "e",
                            "paras": {
                                "successful_devices": [
                                    {"node_id": "n", "device_id": "d", "extension_info": {}}
                                ],
                                "failed_devices": [],
                            },
                        }
                    ]
                }
            ).replace(
                b'"extension_info":{}', b'"extension_info":' + b'{"a":' * 3000 + b"1" + b"}" * 3000
            ),
            "payload nests deeper than the decoder allows (about 1,000 levels)",
        ),
        (b"[1, 2]", "payload is not a JSON object (got an array)"),
        (b'"text"', "payload is not a JSON object (got a string)"),
        (b"null", "payload is not a JSON object (got null)"),
        (b"42", "payload is not a JSON object (got a number)"),
        (b'{"services": 5}', "services: expected `array | null`, got `int`"),
        (b'{"services": [{}]}', "services[0].service_id: missing required field"),
        (
            b'{"services": [{"service_id": "\xff"}]}',
            "payload is not valid UTF-8 (byte 30: invalid start byte)",
        ),
        (
            orjson.dumps({"services": [{**ADD, "paras": {}}]}),
            "services[0].event_id: missing (mandatory for add_sub_device_response)",
        ),
        (
            orjson.dumps({"services": [{**ADD, "event_id": "e"}]}),
            "services[0].paras: missing (mandatory for add_sub_device_response)",
        ),
        (
            add_event({"failed_devices": []}),
            "services[0].paras.successful_devices: missing required field",
        ),
        (
            add_event({"successful_devices": {}, "failed_devices": []}),
            "services[0].paras.successful_devices: expected `array`, got `object`",
        ),
        (
            add_event(
                {"successful_devices": [GOOD_DEVICE, {"device_id": "x"}], "failed_devices": []}
            ),
            "services[0].paras.successful_devices[1].node_id: missing required field",
        ),
        (
            add_event(
                {"successful_devices": [{"node_id": "n", "device_id": 7}], "failed_devices": []}
            ),
            "services[0].paras.successful_devices[0].device_id: expected `str`, got `int`",
        ),
        (
            add_event(
                {"successful_devices": [], "failed_devices": [{**GOOD_REASON, "error_code": 5}]}
            ),
            "services[0].paras.failed_devices[0].error_code: expected `str`, got `int`",
        ),
        (
            add_event(
                {
                    "successful_devices": [{**GOOD_DEVICE, "extension_info": []}],
                    "failed_devices": [],
                }
            ),
            "services[0].paras.successful_devices[0].extension_info: expected `object | null`, got `array`",
        ),
    ],
)
def test_dead_letter_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_down(payload)
    assert str(info.value) == reason


def test_valid_event_keeps_paras_raw() -> None:
    paras = {
        "successful_devices": [{**GOOD_DEVICE, "new_field": 1}],
        "failed_devices": [GOOD_REASON],
    }
    event = decode_down(add_event(paras, extra="kept"))
    assert event.services is not None
    assert len(event.services) == 1
    assert orjson.loads(bytes(event.services[0].paras)) == paras


def test_other_events_are_not_validated() -> None:
    # Never dead-lettered: counted and skipped downstream, whatever their paras.
    event = decode_down(b'{"services": [{"service_id": "$ota", "event_type": "x", "paras": 5}]}')
    assert event.services is not None
    assert event.services[0].service_id == "$ota"


@pytest.mark.parametrize(
    ("topic", "gateway"),
    [
        ("$oc/devices/gw-1/sys/events/down", "gw-1"),
        ("test/abc/$oc/devices/gw_2/sys/events/down", "gw_2"),
        ("$oc/devices/gw-1/sys/messages/down", None),
        ("$oc/devices//sys/events/down", None),
        ("oc/devices/gw/sys/events/down", None),
    ],
)
def test_gateway_from_topic(topic: str, gateway: str | None) -> None:
    assert gateway_from_topic(topic) == gateway


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
device = st.fixed_dictionaries(
    {"node_id": st.text(), "device_id": st.text()},
    optional={
        "name": st.none() | st.text(),
        "extension_info": st.none() | st.dictionaries(st.text(), json_values),
    },
)
# Shapes close to the real thing, with any field possibly replaced by any JSON value.
near_events = st.fixed_dictionaries(
    {
        "services": st.lists(
            st.fixed_dictionaries(
                {
                    "service_id": st.sampled_from(["$sub_device_manager", "$ota"]) | json_values,
                    "event_type": st.sampled_from(["add_sub_device_response", "x"]) | json_values,
                },
                optional={
                    "event_id": st.text() | json_values,
                    "paras": st.fixed_dictionaries(
                        {
                            "successful_devices": st.lists(device | json_values, max_size=3),
                            "failed_devices": st.lists(json_values, max_size=2),
                        }
                    )
                    | json_values,
                },
            ),
            max_size=3,
        )
        | json_values
    }
)


def _decodes_or_explains(payload: bytes) -> None:
    try:
        event = decode_down(payload)
    except DecodeError as exc:
        reason = str(exc)
        assert reason
        assert "\n" not in reason
    else:
        assert event.services is None or isinstance(event.services, list)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes(payload: bytes) -> None:
    _decodes_or_explains(payload)


@settings(max_examples=300, deadline=None)
@given(json_values | near_events)
def test_any_json(value: object) -> None:
    # The stdlib encoder: it also writes integers beyond 64 bits and Infinity.
    _decodes_or_explains(json.dumps(value).encode())


def _nest(depth: int, opener: str, leaf: str) -> str:
    closer = {"[": "]", '{"k":': "}"}[opener]
    return opener * depth + leaf + closer * depth


# Where a deep value can hide: an unknown field, the paras of another event, the paras
# of an add response, a child's extension_info.
_DEEP_SPOTS = [
    '{{"services": [], "x": {v}}}',
    '{{"services": [{{"service_id": "$ota", "event_type": "x", "paras": {v}}}]}}',
    '{{"services": [{{"service_id": "$sub_device_manager", "event_type": "add_sub_device_response", "event_id": "e", "paras": {v}}}]}}',
    '{{"services": [{{"service_id": "$sub_device_manager", "event_type": "add_sub_device_response", "event_id": "e", "paras": {{"successful_devices": [{{"node_id": "n", "device_id": "d", "extension_info": {{"k": {v}}}}}], "failed_devices": []}}}}]}}',
]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 20_000),
    st.sampled_from(["[", '{"k":']),
    st.sampled_from(["1", '"x"', "null", "[]"]),
    st.sampled_from(_DEEP_SPOTS),
)
def test_any_depth(depth: int, opener: str, leaf: str, spot: str) -> None:
    payload = spot.format(v=_nest(depth, opener, leaf)).encode()
    _decodes_or_explains(payload)
    if depth > 2_000:  # far past the limit wherever it is: always dead-lettered, and why
        with pytest.raises(DecodeError, match="nests deeper than the decoder allows"):
            decode_down(payload)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 3_000_000), st.integers(0, 20_000), st.sampled_from(["a", "é", "\u6f22"]))
def test_any_size(string_bytes: int, children: int, char: str) -> None:
    text = char * (string_bytes // len(char.encode()))
    devices = [{"node_id": f"n{i}", "device_id": f"d{i}"} for i in range(children)]
    paras = {"successful_devices": devices, "failed_devices": [], "note": text}
    payload = orjson.dumps({"services": [{**ADD, "event_id": "e", "paras": paras}]})
    event = decode_down(payload)  # size alone never fails the decoder (ingest bounds it)
    assert event.services is not None
    assert len(event.services) == 1
