"""The pure part of pipeline reconcile: the window and the judgement of one child."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from pipeline.core.mapping import Mapper
from pipeline.core.reconcile import Seen, added_record, expect, judge, parse_since, within
from pipeline.errors import InputError
from pipeline.schemas import ChildState

NOW = dt.datetime(2026, 12, 4, 18, 0, tzinfo=dt.UTC)
MAPPER = Mapper(sn_from="node_id", org_id="o1", org_overrides={"p2": "o2"}, device_data={})


def state(kind: str = "added", *, product: str = "p1", device: bool = True) -> ChildState:
    raw = b'{"node_id": "sn-1", "device_id": "d-1", "product_id": "%s"}' % product.encode()
    return ChildState(
        device_id="d-1",
        gateway_id="gw",
        state=kind,  # type: ignore[arg-type]
        generation=4,
        source_event="add_sub_device_notify",
        event_id=None,
        version=9,
        changed_at="2026-12-04T17:00:00.000Z",
        device=msgspec.Raw(raw if device else b"null"),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", NOW - dt.timedelta(minutes=90)),
        ("24h", NOW - dt.timedelta(hours=24)),
        ("7d", NOW - dt.timedelta(days=7)),
        ("1.5h", NOW - dt.timedelta(minutes=90)),
        ("2026-12-01", dt.datetime(2026, 12, 1, tzinfo=dt.UTC)),
        ("2026-12-01T08:00:00Z", dt.datetime(2026, 12, 1, 8, tzinfo=dt.UTC)),
        ("2026-12-01T08:00:00+08:00", dt.datetime(2026, 12, 1, 0, tzinfo=dt.UTC)),
    ],
)
def test_since_is_a_duration_or_a_time(text: str, expected: dt.datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "10", "-5m", "5 minutes", ""])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(InputError, match="give a duration"):
        parse_since(text, NOW)


def test_within_reads_changed_at_else_the_record_time() -> None:
    s = state()
    assert within(s, NOW - dt.timedelta(hours=1), 0)
    assert not within(s, NOW - dt.timedelta(minutes=59), 0)
    unreadable = msgspec.structs.replace(s, changed_at="?")
    assert within(unreadable, NOW, int(NOW.timestamp() * 1000))
    assert not within(unreadable, NOW, int(NOW.timestamp() * 1000) - 1)


def test_the_mapping_is_the_sinks() -> None:
    assert (expect(state(), MAPPER).sn, expect(state(), MAPPER).org_id) == ("sn-1", "o1")
    assert expect(state(product="p2"), MAPPER).org_id == "o2"
    record = added_record(state())
    assert (record.source_event, record.generation, record.version) == ("reconcile", 4, 9)


ALLOCATED = Seen(allocated=True, status="allocated", org_id="o1")
INIT = Seen(allocated=False, status="init", org_id=None)


@pytest.mark.parametrize(
    ("kind", "seen", "on_delete", "found"),
    [
        ("added", ALLOCATED, "reset", None),
        ("added", None, "reset", ("missing", True, "unknown")),
        ("added", INIT, "reset", ("missing", True, "init")),
        (
            "added",
            Seen(allocated=True, status="allocated", org_id="o9"),
            "reset",
            ("other_org", True, "allocated"),
        ),
        ("deleted", ALLOCATED, "reset", ("deleted_allocated", True, "allocated")),
        ("deleted", ALLOCATED, "delete", ("deleted_allocated", True, "allocated")),
        ("deleted", ALLOCATED, "record", ("kept", False, "allocated")),
        ("deleted", INIT, "reset", None),
        ("deleted", None, "reset", None),
    ],
)
def test_judge(
    kind: str, seen: Seen | None, on_delete: str, found: tuple[str, bool, str] | None
) -> None:
    result = judge(expect(state(kind), MAPPER), seen, on_delete=on_delete)  # type: ignore[arg-type]
    assert (None if result is None else (result.kind, result.counted, result.dps_status)) == found


def test_judge_without_an_sn_or_an_answer() -> None:
    never_added = judge(expect(state("deleted", device=False), MAPPER), None, on_delete="reset")
    assert never_added is not None
    assert (never_added.kind, never_added.counted) == ("unknown_sn", False)
    refused = judge(expect(state(), MAPPER), None, on_delete="reset", refused="35400 sn blank")
    assert refused is not None
    assert (refused.kind, refused.counted, refused.detail) == (
        "unchecked",
        True,
        "DPS refused the lookup: 35400 sn blank",
    )
