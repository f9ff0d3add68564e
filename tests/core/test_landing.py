"""The lander: a down-event record is msgspec's encoding of DownEventRecord, byte for byte."""

from __future__ import annotations

import datetime as dt

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import landing
from pipeline.core.landing import Lander
from pipeline.schemas import DownEventRecord, format_time, normalise_event_time, utc_now

EVENT = orjson.dumps(
    {
        "services": [
            {
                "service_id": "$sub_device_manager",
                "event_type": "add_sub_device_response",
                "event_id": "e1",
                "paras": {"successful_devices": [], "failed_devices": []},
            }
        ]
    }
)


def _whole(gateway: str, topic: str, received_at: str, payload: bytes) -> bytes:
    record = DownEventRecord(
        gateway_id=gateway, mqtt_topic=topic, received_at=received_at, event=msgspec.Raw(payload)
    )
    return msgspec.json.encode(record)


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.text(max_size=20).map(lambda p: p.rstrip("/") + "/" if p else ""),
    gateway=st.text(min_size=1, max_size=20).filter(lambda g: "/" not in g),
    received_at=st.text(max_size=30),
)
def test_a_record_is_msgspecs_encoding(prefix: str, gateway: str, received_at: str) -> None:
    # Quotes, backslashes, control characters and any Unicode in the topic and the time.
    topic = f"{prefix}$oc/devices/{gateway}/sys/events/down"
    lander = Lander(max_payload=1 << 20, max_record=1 << 20)
    for _ in range(2):  # worked out, then remembered
        got = lander.land(topic, EVENT, received_at)
        assert not got.dead, got.reason
        assert got.key == gateway.encode()
        assert got.value == _whole(gateway, topic, received_at, EVENT)


def test_topics_beyond_those_kept_still_land(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(landing, "_TOPICS_KEPT", 3)
    lander = Lander(max_payload=1 << 20, max_record=1 << 20)
    for n in range(10):
        topic = f"$oc/devices/gw-{n}/sys/events/down"
        got = lander.land(topic, EVENT, "t")
        assert got.value == _whole(f"gw-{n}", topic, "t", EVENT)
        assert len(lander._topics) <= 3


def test_utc_now_is_format_time_of_now() -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    texts = [utc_now() for _ in range(1000)]
    after = dt.datetime.now(dt.UTC)
    for text in texts:
        when = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        assert before <= when <= after
        assert format_time(when) == text
    assert texts == sorted(texts)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("20151212T121212Z", "2015-12-12T12:12:12.000Z"),  # as IoTDA documents it
        ("2015-12-12T12:12:12Z", "2015-12-12T12:12:12.000Z"),  # as its device SDK sends it
        ("2015-12-12T20:12:12.5+08:00", "2015-12-12T12:12:12.500Z"),
        ("2015-12-12T12:12:12", None),  # no zone: a guess
        ("", None),
        (None, None),
        ("2" * 100_000, None),  # longer than any time: read, not cached
    ],
)
def test_event_times_are_normalised_alike_the_first_time_and_again(
    raw: str | None, expected: str | None
) -> None:
    assert [normalise_event_time(raw) for _ in range(2)] == [expected, expected]
