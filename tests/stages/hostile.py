"""A hostile corpus: payloads of every bad kind, each with the exact reason it must get.

Used by tests/stages/test_hostile.py (through the real ingest and router) and kept apart
so the cases read as a list.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

from tests.harness import add_response

ADD = {"service_id": "$sub_device_manager", "event_type": "add_sub_device_response"}
_M = "(mandatory for add_sub_device_response)"


def event(event_id: str, sns: list[str], failed: list[str] | None = None) -> dict[str, Any]:
    """A valid add_sub_device_response from gateway ``gw`` adding ``sns``."""
    return {"object_device_id": "gw", **add_response(event_id, sns, failed or [])}


def _broken(path: list[str | int], value: object = ..., *, drop: bool = False) -> bytes:
    body = event("e-broken", ["sn-b"], ["sn-f"])
    node: Any = body
    for step in path[:-1]:
        node = node[step]
    if drop:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return orjson.dumps(body)


S: list[str | int] = ["services", 0]
P: list[str | int] = [*S, "paras"]
DEV: list[str | int] = [*P, "successful_devices", 0]
REA: list[str | int] = [*P, "failed_devices", 0]

# (name, payload, exact DLQ reason)
BAD: list[tuple[str, bytes, str]] = [
    ("empty", b"", "payload is empty"),
    ("whitespace", b" \t\r\n ", "payload is only whitespace"),
    ("null", b"null", "payload is not a JSON object (got null)"),
    ("array root", b"[]", "payload is not a JSON object (got an array)"),
    ("number root", b"12", "payload is not a JSON object (got a number)"),
    ("not json", b"<xml/>", "payload is not valid JSON (invalid character at byte 0)"),
    (
        "truncated",
        b'{"services": [',
        "payload is not valid JSON (it ends before the JSON value does)",
    ),
    (
        "invalid utf-8",
        b'{"services": [], "x": "\xc3\x28"}',
        "payload is not valid UTF-8 (byte 23: invalid continuation byte)",
    ),
    (
        "byte-order mark",
        b'\xef\xbb\xbf{"services": []}',
        "payload starts with a UTF-8 byte-order mark, which JSON does not allow",
    ),
    (
        "NaN",
        b'{"services": [], "x": NaN}',
        "payload contains NaN or Infinity, which JSON does not allow (byte 22)",
    ),
    (
        "Infinity",
        b'{"services": [], "x": Infinity}',
        "payload contains NaN or Infinity, which JSON does not allow (byte 22)",
    ),
    (
        "trailing data",
        b'{"services": []}{"services": []}',
        "payload has data after the JSON value (from byte 16)",
    ),
    (
        "deep nesting",
        b'{"services": [{"service_id": "$ota", "event_type": "x", "paras": '
        + b"[" * 1000
        + b"]" * 1000
        + b"}]}",
        "payload nests deeper than the decoder allows (about 1,000 levels)",
    ),
    # wrong types, level by level
    (
        "services: object",
        _broken(["services"], {}),
        "services: expected `array | null`, got `object`",
    ),
    ("service: string", _broken(S, "x"), "services[0]: expected `object`, got `str`"),
    (
        "service_id: number",
        _broken([*S, "service_id"], 7),
        "services[0].service_id: expected `str`, got `int`",
    ),
    (
        "event_id: number",
        _broken([*S, "event_id"], 7),
        "services[0].event_id: expected `str | null`, got `int`",
    ),
    ("paras: array", _broken(P, []), "services[0].paras: expected `object`, got `array`"),
    (
        "successful_devices: string",
        _broken([*P, "successful_devices"], "x"),
        "services[0].paras.successful_devices: expected `array`, got `str`",
    ),
    (
        "device: number",
        _broken(DEV, 5),
        "services[0].paras.successful_devices[0]: expected `object`, got `int`",
    ),
    (
        "node_id: number",
        _broken([*DEV, "node_id"], 5),
        "services[0].paras.successful_devices[0].node_id: expected `str`, got `int`",
    ),
    (
        "extension_info: list",
        _broken([*DEV, "extension_info"], [1]),
        "services[0].paras.successful_devices[0].extension_info: expected `object | null`, got `array`",
    ),
    (
        "reason: array",
        _broken(REA, []),
        "services[0].paras.failed_devices[0]: expected `object`, got `array`",
    ),
    (
        "error_code: number",
        _broken([*REA, "error_code"], 101004),
        "services[0].paras.failed_devices[0].error_code: expected `str`, got `int`",
    ),
    # missing mandatory fields, level by level
    (
        "no service_id",
        _broken([*S, "service_id"], drop=True),
        "services[0].service_id: missing required field",
    ),
    (
        "no event_type",
        _broken([*S, "event_type"], drop=True),
        "services[0].event_type: missing required field",
    ),
    ("no event_id", _broken([*S, "event_id"], drop=True), f"services[0].event_id: missing {_M}"),
    ("no paras", _broken(P, drop=True), f"services[0].paras: missing {_M}"),
    (
        "no successful_devices",
        _broken([*P, "successful_devices"], drop=True),
        "services[0].paras.successful_devices: missing required field",
    ),
    (
        "no failed_devices",
        _broken([*P, "failed_devices"], drop=True),
        "services[0].paras.failed_devices: missing required field",
    ),
    (
        "no node_id",
        _broken([*DEV, "node_id"], drop=True),
        "services[0].paras.successful_devices[0].node_id: missing required field",
    ),
    (
        "no device_id",
        _broken([*DEV, "device_id"], drop=True),
        "services[0].paras.successful_devices[0].device_id: missing required field",
    ),
    (
        "no reason node_id",
        _broken([*REA, "node_id"], drop=True),
        "services[0].paras.failed_devices[0].node_id: missing required field",
    ),
    (
        "no error_msg",
        _broken([*REA, "error_msg"], drop=True),
        "services[0].paras.failed_devices[0].error_msg: missing required field",
    ),
]


def odd_but_valid(uid: str) -> list[tuple[str, bytes, list[str]]]:
    """Payloads that look odd but are valid events: (name, payload, the sns they add)."""
    dup = orjson.dumps(event(f"dup-{uid}", [f"{uid}-dup"]))
    # Duplicate keys: the last one wins (as in msgspec and most parsers).
    duplicated = (
        dup[:-1]
        + b', "services": '
        + orjson.dumps(event(f"dup2-{uid}", [f"{uid}-dup2"])["services"])
        + b"}"
    )
    huge_int = copy.deepcopy(event(f"int-{uid}", [f"{uid}-int"]))
    huge_int["services"][0]["paras"]["successful_devices"][0]["extension_info"] = {"big": 0}
    huge = orjson.dumps(huge_int).replace(b'"big":0', b'"big":' + b"9" * 400)
    long_string = event(f"str-{uid}", [f"{uid}-str"])
    long_string["services"][0]["paras"]["successful_devices"][0]["description"] = "x" * 1_000_000
    return [
        ("duplicate keys", duplicated, [f"{uid}-dup2"]),
        ("huge integer", huge, [f"{uid}-int"]),
        ("1 MB string", orjson.dumps(long_string), [f"{uid}-str"]),
    ]
