"""The bench's input: messages, records and requests, fed alike to a stage and its ceiling.

Every MQTT message is an ``add_sub_device_response`` adding :data:`CHILDREN` children, as
IoTDA sends it. From those messages come, by the project's own pure functions, the
down-event records the router reads (:class:`~pipeline.core.landing.Lander`, as ingest
writes them), the child records the sink reads (:func:`~pipeline.core.routing.route`, as
the router writes them) and the DPS requests the sink sends
(:class:`~pipeline.core.mapping.Mapper`). So a stage and its ceiling get exactly the
same bytes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
import orjson

from pipeline.core.landing import Lander
from pipeline.core.mapping import Mapper
from pipeline.core.routing import Changes, Memory, apply, route
from pipeline.schemas import utc_now
from pipeline.tools.replay import FixtureMessage

if TYPE_CHECKING:
    from pipeline.config import Config

__all__ = [
    "CHILDREN",
    "GATEWAYS",
    "Request",
    "child_records",
    "down_records",
    "e2e_message",
    "messages",
    "requests",
    "sent_ns",
]

CHILDREN = 4
"""Children per add_sub_device_response (the issue's end-to-end load: 4 per message)."""
GATEWAYS = 10
"""Gateways the messages come from (their ids key the down-event records)."""

_E2E = "e2e"


class Request(msgspec.Struct, frozen=True):
    """One DPS allocate call: the orgId query parameter and the JSON body, as the sink sends."""

    org_id: str
    body: str


def _payload(seq: int, tag: str, event_id: str) -> bytes:
    devices = [
        {
            "node_id": f"sn-{tag}-{seq:07d}-{c}",
            "device_id": f"product_{tag}-{seq:07d}-{c}",
            "product_id": "product",
            "name": f"inverter {c}",
            "model": "SUN2000-5KTL",
            "status": "ONLINE",
            "extension_info": {"rated_kw": 5},
        }
        for c in range(CHILDREN)
    ]
    event = {
        "object_device_id": f"gw-{seq % GATEWAYS}",
        "services": [
            {
                "service_id": "$sub_device_manager",
                "event_type": "add_sub_device_response",
                "event_time": "20261122T063000Z",
                "event_id": event_id,
                "paras": {"successful_devices": devices, "failed_devices": []},
            }
        ],
    }
    return orjson.dumps(event)


def _topic(seq: int) -> str:
    return f"$oc/devices/gw-{seq % GATEWAYS}/sys/events/down"


def messages(count: int, tag: str) -> list[FixtureMessage]:
    """``count`` MQTT messages; ``tag`` (fixed width) makes their sns unique to a data set."""
    return [
        FixtureMessage(topic=_topic(seq), payload=_payload(seq, tag, f"{tag}-{seq:07d}"))
        for seq in range(count)
    ]


def down_records(batch: list[FixtureMessage]) -> list[tuple[bytes, bytes]]:
    """``iotda.down-events`` (key, value) pairs, exactly as ingest writes them."""
    lander = Lander(max_payload=1 << 20, max_record=2 << 20)
    out = []
    for message in batch:
        landing = lander.land(message.topic, message.payload, utc_now())
        if landing.dead or landing.key is None:
            msg = f"bench message did not land: {landing.reason}"
            raise ValueError(msg)
        out.append((landing.key, landing.value))
    return out


def child_records(records: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``iotda.subdevices.added`` (key, value) pairs, exactly as the router writes them."""
    memory = Memory()  # one router's memory over the whole workload
    out = []
    for _, value in records:
        routed = route(value)
        changes = Changes(memory)
        for event in routed.events:
            applied = apply(routed.gateway_id, event, changes, utc_now())
            out += [(o.key, o.value) for o in applied.outs if o.topic == "added"]
        changes.commit()
    return out


def requests(cfg: Config, children: list[tuple[bytes, bytes]]) -> list[Request]:
    """The allocate calls the sink makes for ``children`` under ``cfg.sink``."""
    s = cfg.sink
    mapper = Mapper(
        sn_from=s.sn_from, org_id=s.org_id, org_overrides=s.org_overrides,
        device_data=s.device_data,
    )  # fmt: skip
    encode = msgspec.json.Encoder().encode
    out = []
    for _, value in children:
        mapped = mapper.map(value)
        out.append(Request(mapped.org_id, encode(mapped.request).decode()))
    return out


def e2e_message(seq: int, phase: str) -> FixtureMessage:
    """A message whose event_id carries the time it is built, for end-to-end latency.

    Build it just before publishing: ``event_id`` is ``e2e-<phase>-<seq>-<time_ns>`` and
    every allocation of its children carries it (``Allocation.event_id``).
    """
    event_id = f"{_E2E}-{phase}-{seq:07d}-{time.time_ns()}"
    return FixtureMessage(topic=_topic(seq), payload=_payload(seq, f"{_E2E}{phase}", event_id))


def sent_ns(event_id: str) -> int | None:
    """The send time an :func:`e2e_message` event_id carries, or None for another id."""
    head, _, stamp = event_id.rpartition("-")
    if not head.startswith(_E2E) or not stamp.isdigit():
        return None
    return int(stamp)
