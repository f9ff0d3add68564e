"""``pipeline schemas export``: JSON Schemas and an AsyncAPI document, generated from the code."""

from __future__ import annotations

import inspect
import logging
import re
import sys
from pathlib import Path
from typing import Any

import msgspec
import orjson

from pipeline import schemas as s
from pipeline.config import Config

__all__ = ["documents", "export"]

log = logging.getLogger(__name__)

# Every shape that crosses a wire, with the file name it is exported under.
EXPORTED: dict[str, type[msgspec.Struct]] = {
    "iotda.down-event": s.DownEvent,
    "iotda.add_sub_device_response.paras": s.AddSubDeviceResponse,
    "iotda.add_sub_device_notify.paras": s.AddSubDeviceNotify,
    "iotda.delete_sub_device_notify.paras": s.DeleteSubDeviceNotify,
    "iotda.delete_sub_device_response.paras": s.DeleteSubDeviceResponse,
    "iotda.sub_device_update_status.paras": s.StatusUpdateResponse,
    "kafka.down-event": s.DownEventRecord,
    "kafka.added-child": s.AddedChild,
    "kafka.failed-child": s.FailedChild,
    "kafka.deleted-child": s.DeletedChild,
    "kafka.child-state": s.ChildState,
    "kafka.sync-request": s.SyncRequest,
    "kafka.allocation": s.Allocation,
    "kafka.release": s.Release,
    "kafka.allocation-failure": s.AllocationFailure,
    "dps.token.request": s.TokenRequest,
    "dps.token.response": s.TokenResponse,
    "dps.allocate.request": s.AllocateRequest,
    "dps.search.request": s.SearchRequest,
    "dps.reset.request": s.ResetAllocationRequest,
    "dps.delete.request": s.DeleteDevicesRequest,
    "dps.page-response": s.DpsPageEnvelope,
    "dps.response": s.DpsEnvelope,
    "dps.pvs-device": s.PvsDevice,
}
# Referenced by the pass-through (Raw) fields, so every document can resolve them.
_REFERENCED = (s.DeviceInfo, s.Reason, s.PvsDevice, s.DownEvent, s.AddedChild, s.DeletedChild)
_REF = re.compile(r'"\$ref":"#/\$defs/([^"]+)"')


def _closure(name: str, components: dict[str, Any]) -> dict[str, Any]:
    """The components reachable from ``name``."""
    seen: dict[str, Any] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen[current] = components[current]
        todo.extend(_REF.findall(orjson.dumps(components[current]).decode()))
    return dict(sorted(seen.items()))


def _normalise(schema: Any) -> Any:
    """``schema`` as every msgspec the project allows would write it.

    msgspec's output changed across ``msgspec>=0.19,<1`` in two ways that do not change
    what a schema means, and both are undone here so ``schemas/`` stays byte-identical:

    - Descriptions: Struct docstrings become ``description``s, dedented differently
      (0.22 keeps the indentation of a docstring's later lines, 0.23 strips it, and so
      does Python 3.13 at compile time). Each is cleaned as :func:`inspect.cleandoc` does.
    - ``anyOf``: ``Struct | None`` lists ``null`` first before 0.22, last from 0.22 on.
      ``null`` goes last, in a stable sort, so the other alternatives keep their order.
    """
    if isinstance(schema, list):
        return [_normalise(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    # A property named "description" or "anyOf" maps to a schema (a dict), not to a
    # string or a list: it is walked like any other schema, never rewritten.
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            out[key] = inspect.cleandoc(value)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = sorted(_normalise(value), key=lambda alt: alt == {"type": "null"})
        else:
            out[key] = _normalise(value)
    return out


def _header(text: str) -> dict[str, Any]:
    return {"type": "string", "description": text}


def documents() -> dict[str, bytes]:
    """File name -> content of every document in ``schemas/``."""
    types = [*EXPORTED.values(), *_REFERENCED]
    refs, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    components = _normalise(components)
    out: dict[str, bytes] = {}
    for (file, tp), ref in zip(EXPORTED.items(), refs, strict=False):
        name = ref["$ref"].rsplit("/", 1)[1]
        doc = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"{file}.schema.json",
            "title": tp.__name__,
            "$ref": ref["$ref"],
            "$defs": _closure(name, components),
        }
        out[f"{file}.schema.json"] = _dump(doc)
    out["asyncapi.json"] = _dump(_asyncapi(components))
    return out


def _asyncapi(components: dict[str, Any]) -> dict[str, Any]:
    topics = Config().kafka.topics
    mqtt_topic = Config().mqtt.topic.replace("+", "{gateway_id}")

    # Every Kafka record the pipeline writes carries its trace (pipeline/ops/tracing.py).
    trace = {
        "traceparent": _header("W3C trace context of the down event's trace"),
        "tracestate": _header("W3C trace state, when the trace has one"),
    }

    def traced(headers: dict[str, Any] | None) -> dict[str, Any]:
        headers = headers or {"type": "object", "properties": {}}
        return headers | {
            "required": ["traceparent", *headers.get("required", [])],
            "properties": trace | headers["properties"],
        }

    def message(name: str, schema: str, text: str, key: str | None, headers: Any = None) -> Any:
        msg: dict[str, Any] = {
            "name": name,
            "contentType": "application/json",
            "summary": text,
            "payload": {"$ref": f"#/components/schemas/{schema}"},
        }
        if key is not None:  # a Kafka record
            msg["bindings"] = {"kafka": {"key": {"type": ["string", "null"], "description": key}}}
            msg["headers"] = traced(headers)
        return msg

    dlq_headers = {
        "type": "object",
        "required": ["error", "mqtt-topic", "received-at"],
        "properties": {
            "error": _header("Why the payload was dead-lettered, naming the field at fault"),
            "mqtt-topic": _header("The MQTT topic it arrived on"),
            "received-at": _header("RFC 3339 UTC with milliseconds"),
        },
    }
    outcome_headers = {
        "type": "object",
        "properties": {
            "source": _header("input topic/partition/offset of the record"),
            "sink-group": _header("consumer group of the sink that wrote it"),
        },
    }
    messages = {
        "DownEventMqtt": message(
            "DownEvent", "DownEvent", "IoTDA down event (any service); QoS 1", None
        ),
        "DownEventRecord": message(
            "DownEventRecord", "DownEventRecord", "A landed down event", "gateway device_id"
        ),
        "DownEventDlq": {
            "name": "DownEventDeadLetter",
            "contentType": "application/octet-stream",
            "summary": "The MQTT payload exactly as received",
            "payload": {"type": "string", "format": "binary"},
            "headers": traced(dlq_headers),
            "bindings": {"kafka": {"key": {"type": ["string", "null"]}}},
        },
        "AddedChild": message("AddedChild", "AddedChild", "A child IoTDA added", "child device_id"),
        "FailedChild": message(
            "FailedChild", "FailedChild", "A child IoTDA could not add", "child node_id"
        ),
        "DeletedChild": message(
            "DeletedChild", "DeletedChild", "A child IoTDA deleted", "child device_id"
        ),
        "ChildState": message(
            "ChildState",
            "ChildState",
            "A child's latest state (compacted: the newest record per key is kept)",
            "child device_id",
        ),
        "SyncRequest": message(
            "SyncRequest",
            "SyncRequest",
            "Versions of a gateway's notifications that never arrived",
            "gateway device_id",
        ),
        "Allocation": message(
            "Allocation", "Allocation", "DPS allocated the child", "sn", outcome_headers
        ),
        "Release": message(
            "Release", "Release", "What the sink did for a deleted child", "sn", outcome_headers
        ),
        "AllocationFailure": message(
            "AllocationFailure",
            "AllocationFailure",
            "The child was not allocated or released: rejected, exhausted, invalid or superseded",
            "sn",
            outcome_headers,
        ),
    }
    channels = {
        "mqttDownEvents": {
            "address": mqtt_topic,
            "parameters": {"gateway_id": {"description": "the gateway's device_id"}},
            "messages": {"DownEvent": {"$ref": "#/components/messages/DownEventMqtt"}},
        },
    }
    for channel, topic, msg in (
        ("downEvents", topics.down_events, "DownEventRecord"),
        ("downEventsDlq", topics.down_events_dlq, "DownEventDlq"),
        ("subdevicesAdded", topics.added, "AddedChild"),
        ("subdevicesFailed", topics.failed, "FailedChild"),
        ("subdevicesDeleted", topics.deleted, "DeletedChild"),
        ("subdevicesLifecycle", topics.lifecycle, "ChildState"),
        ("syncRequests", topics.sync_requests, "SyncRequest"),
        ("allocations", topics.allocations, "Allocation"),
        ("releases", topics.releases, "Release"),
        ("allocationsDlq", topics.allocations_dlq, "AllocationFailure"),
    ):
        channels[channel] = {
            "address": topic,
            "messages": {msg: {"$ref": f"#/components/messages/{msg}"}},
        }

    def op(action: str, channel: str, text: str) -> dict[str, Any]:
        return {"action": action, "channel": {"$ref": f"#/channels/{channel}"}, "summary": text}

    operations = {
        "ingestReceive": op("receive", "mqttDownEvents", "ingest subscribes (QoS 1)"),
        "ingestLand": op("send", "downEvents", "ingest lands decodable events"),
        "ingestDeadLetter": op("send", "downEventsDlq", "ingest dead-letters the rest"),
        "routerReceive": op("receive", "downEvents", "router reads committed"),
        "routerAdded": op("send", "subdevicesAdded", "router, transactionally"),
        "routerFailed": op("send", "subdevicesFailed", "router, transactionally"),
        "routerDeleted": op("send", "subdevicesDeleted", "router, transactionally"),
        "routerLifecycle": op("send", "subdevicesLifecycle", "router, with each child record"),
        "routerSyncRequests": op("send", "syncRequests", "router, when a version gap is seen"),
        "ingestSyncRequests": op(
            "receive", "syncRequests", "ingest asks IoTDA to resend (device mode)"
        ),
        "sinkReceive": op("receive", "subdevicesAdded", "sink calls DPS allocate"),
        "sinkReceiveDeleted": op(
            "receive", "subdevicesDeleted", "sink releases per sink.on_delete"
        ),
        "sinkAllocated": op("send", "allocations", "sink records successes"),
        "sinkReleased": op("send", "releases", "sink records what it released"),
        "sinkDeadLetter": op("send", "allocationsDlq", "sink records permanent failures"),
    }
    schemas = {name: _rewrite_refs(schema) for name, schema in sorted(components.items())}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "iot-pipeline",
            "version": "1",
            "description": "IoTDA child-device events to EnOS DPS allocations, through Kafka.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def _rewrite_refs(schema: Any) -> Any:
    return orjson.loads(orjson.dumps(schema).replace(b'"#/$defs/', b'"#/components/schemas/'))


def _dump(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def export(directory: Path, *, check: bool = False) -> int:
    """Write ``directory`` (or, with ``check``, report whether it is stale); exit code."""
    wanted = documents()
    present = {p.name for p in directory.glob("*.json")} if directory.exists() else set()
    stale = sorted(
        name
        for name, content in wanted.items()
        if not (directory / name).exists() or (directory / name).read_bytes() != content
    )
    extra = sorted(present - wanted.keys())
    if check:
        if stale or extra:
            problems = [f"{n} is out of date" for n in stale] + [
                f"{n} is not generated" for n in extra
            ]
            print(  # noqa: T201
                f"{directory}/ is stale ({'; '.join(problems)}): run `pipeline schemas export`",
                file=sys.stderr,
            )
            return 1
        print(f"{directory}/ is up to date ({len(wanted)} documents)")  # noqa: T201
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    for name in extra:
        (directory / name).unlink()
    for name in stale:
        (directory / name).write_bytes(wanted[name])
    print(f"wrote {len(stale)} of {len(wanted)} documents to {directory}/")  # noqa: T201
    return 0
