"""Decode and validate IoTDA down events: pure functions, no I/O.

Every payload either decodes into a :class:`DownEvent` or raises :class:`DecodeError`
whose message names the problem in the form a person can act on:
``services[0].paras.successful_devices[1].node_id: missing required field``,
``payload starts with a UTF-8 byte-order mark``, ``payload contains NaN or Infinity``,
``payload nests deeper than the decoder allows``... No other exception escapes, whatever
the bytes (a property test holds this, depth and size included).
"""

from __future__ import annotations

import re

import msgspec

from pipeline.core.problems import explain, malformed
from pipeline.errors import DecodeError
from pipeline.schemas import ADD_RESPONSE, PARAS, SUB_DEVICE_MANAGER, DownEvent, ServiceEvent

__all__ = ["KNOWN_EVENTS", "decode_down", "gateway_from_topic", "json_problem", "service_label"]

_DOWN_TOPIC = re.compile(r"(?:^|/)\$oc/devices/([^/]+)/sys/events/down$")

_ENVELOPE = msgspec.json.Decoder(DownEvent)
# Only add_sub_device_response is validated: other events are counted, never dead-lettered.
_ADD_DECODER = msgspec.json.Decoder(PARAS[SUB_DEVICE_MANAGER, ADD_RESPONSE])

KNOWN_EVENTS: frozenset[tuple[str, str]] = frozenset(
    {
        *PARAS,
        ("$time_sync", "time_sync_response"),
        ("$ota", "firmware_upgrade"),
        ("$ota", "software_upgrade"),
        ("$ota", "firmware_upgrade_v2"),
        ("$ota", "software_upgrade_v2"),
        ("$file_manager", "get_upload_url_response"),
        ("$file_manager", "get_download_url_response"),
    }
)
"""Down events this pipeline knows; anything else is counted as ``other``."""


def gateway_from_topic(topic: str) -> str | None:
    """The gateway device_id in ``[prefix/]$oc/devices/{device_id}/sys/events/down``."""
    match = _DOWN_TOPIC.search(topic)
    return match.group(1) if match else None


def service_label(service: ServiceEvent) -> tuple[str, str]:
    """Bounded metric labels: the known (service_id, event_type), or ("other", "other")."""
    key = (service.service_id, service.event_type)
    return key if key in KNOWN_EVENTS else ("other", "other")


def _explain(exc: msgspec.ValidationError, prefix: str) -> str:
    problem = explain(exc, prefix)
    if not problem.path and problem.got:
        return f"payload is not a JSON object (got {problem.got})"
    return f"{problem.path or 'payload'}: {problem.reason}"


def decode_down(payload: bytes) -> DownEvent:
    """Decode one MQTT payload, validating every ``add_sub_device_response`` in it.

    Other events (known or not) are decoded only as far as the envelope: they are
    counted and skipped downstream, never dead-lettered.

    The well-formed path is msgspec's decode and one ASCII scan; what is wrong with a
    payload (empty, a byte-order mark, not UTF-8...) is worked out only once msgspec
    refuses it, so the common case pays for nothing else.

    Raises:
        DecodeError: the payload is empty, not UTF-8, not JSON, not an object, nests too
            deeply, or breaks the documented types or mandatory fields of an
            add_sub_device_response.
    """
    try:
        event = _ENVELOPE.decode(payload)
    except msgspec.ValidationError as exc:
        raise DecodeError(_encoding_problem(payload) or _explain(exc, "")) from None
    except msgspec.DecodeError as exc:
        raise DecodeError(_syntax_problem(exc, payload)) from None
    except UnicodeDecodeError:  # in a string msgspec decoded
        raise DecodeError(_encoding_problem(payload) or "payload is not valid UTF-8") from None
    except RecursionError:
        raise DecodeError(_TOO_DEEP) from None
    # msgspec checks UTF-8 only in the strings it decodes, not in skipped fields or paras.
    if not payload.isascii() and (problem := _encoding_problem(payload)) is not None:
        raise DecodeError(problem)
    for i, service in enumerate(event.services or ()):
        if service.service_id == SUB_DEVICE_MANAGER and service.event_type == ADD_RESPONSE:
            _validate_add_response(i, service)
    return event


_NULL = msgspec.Raw(b"null")
_TOO_DEEP = "payload nests deeper than the decoder allows (about 1,000 levels)"
_BOMS = {
    b"\xef\xbb\xbf": "payload starts with a UTF-8 byte-order mark, which JSON does not allow",
    b"\xff\xfe": "payload is UTF-16 (little-endian byte-order mark), not UTF-8",
    b"\xfe\xff": "payload is UTF-16 (big-endian byte-order mark), not UTF-8",
}


def _syntax_problem(exc: msgspec.DecodeError, payload: bytes) -> str:
    if not payload.strip():
        return "payload is empty" if not payload else "payload is only whitespace"
    return _encoding_problem(payload) or json_problem(exc, payload)


def _encoding_problem(payload: bytes) -> str | None:
    for bom, problem in _BOMS.items():
        if payload.startswith(bom):
            return problem
    if payload.isascii():
        return None
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"payload is not valid UTF-8 (byte {exc.start}: {exc.reason})"
    return None


def json_problem(exc: msgspec.DecodeError, payload: bytes) -> str:
    """What is wrong with ``payload``'s JSON syntax, in words, from msgspec's error."""
    what, byte = malformed(exc)
    if byte is not None and what == "invalid character":
        rest = payload[byte : byte + 9]
        if rest.startswith((b"NaN", b"Infinity", b"-Infinity")):
            return f"payload contains NaN or Infinity, which JSON does not allow (byte {byte})"
    if what == "trailing characters" and byte is not None:
        # msgspec points one byte past the first trailing one (pinned in test_problems).
        return f"payload has data after the JSON value (from byte {byte - 1})"
    if what == "truncated":
        return "payload is not valid JSON (it ends before the JSON value does)"
    return f"payload is not valid JSON ({what}{f' at byte {byte}' if byte is not None else ''})"


def _validate_add_response(i: int, service: ServiceEvent) -> None:
    if service.event_id is None:
        msg = f"services[{i}].event_id: missing (mandatory for {ADD_RESPONSE})"
        raise DecodeError(msg)
    try:
        _ADD_DECODER.decode(service.paras)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        if not service.paras or service.paras == _NULL:  # absent (empty Raw) or null
            msg = f"services[{i}].paras: missing (mandatory for {ADD_RESPONSE})"
            raise DecodeError(msg) from None
        if not isinstance(exc, msgspec.ValidationError):  # not reached: the envelope parsed it
            msg = f"services[{i}].paras: {exc}"
            raise DecodeError(msg) from None
        raise DecodeError(_explain(exc, f".services[{i}].paras")) from None
    except RecursionError:
        raise DecodeError(_TOO_DEEP) from None
