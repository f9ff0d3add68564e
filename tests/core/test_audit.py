"""The audit's bookkeeping, without a broker: each kind of gap, counted exactly."""

from __future__ import annotations

import pytest

from pipeline.core.audit import (
    Gap,
    Hashes,
    Ledger,
    Origins,
    Report,
    child_key,
    failed_key,
    older_first,
    unrouted,
)


def test_each_kind_of_gap_and_what_is_no_gap() -> None:
    ledger = Ledger("added")
    for offset in range(8):
        ledger.add(0, offset)
    ledger.add(1, 3)
    ledger.allocated(0, 0)  # done
    # 0/1: nothing (missing)
    ledger.allocated(0, 2)
    ledger.allocated(0, 2)  # two allocations
    ledger.dead_lettered(0, 3, redriven=False, waiting=True)  # waiting for a redrive
    ledger.dead_lettered(0, 4, redriven=True, waiting=True)  # put back: no gap
    ledger.dead_lettered(0, 5, redriven=False, waiting=False)  # superseded by a delete
    ledger.allocated(0, 6)
    ledger.dead_lettered(0, 6, redriven=False, waiting=True)  # allocated and dead-lettered
    ledger.dead_lettered(0, 7, redriven=True, waiting=True)
    ledger.allocated(0, 7)  # redriven, and yet allocated from the original too
    ledger.allocated(1, 3)
    assert not ledger.allocated(1, 4)  # not a child of the window
    assert not ledger.dead_lettered(2, 0, redriven=False, waiting=True)
    found = [(v.kind, v.partition, v.offset) for v in ledger.verdicts()]
    assert found == [
        ("missing", 0, 1),
        ("duplicate", 0, 2),
        ("dead-lettered", 0, 3),
        ("duplicate", 0, 6),
        ("duplicate", 0, 7),
    ]
    details = {v.offset: v.detail for v in ledger.verdicts()}
    assert details[2] == "2 allocations, 0 DLQ records, 0 redriven"
    assert details[6] == "1 allocations, 1 DLQ records, 0 redriven"
    assert details[7] == "1 allocations, 0 DLQ records, 1 redriven"
    assert len(ledger) == 9


def test_offsets_must_ascend_per_partition() -> None:
    ledger = Ledger("added")
    ledger.add(0, 5)
    ledger.add(1, 2)
    with pytest.raises(ValueError, match="offset 5 after 5"):
        ledger.add(0, 5)


def test_counters_saturate_without_overflow() -> None:
    ledger = Ledger("added")
    ledger.add(0, 0)
    for _ in range(300):
        ledger.allocated(0, 0)
    [verdict] = ledger.verdicts()
    assert verdict.detail == "255 allocations, 0 DLQ records, 0 redriven"


def test_hashes_and_origins() -> None:
    hashes = Hashes()
    with pytest.raises(RuntimeError):
        _ = 1 in hashes
    for value in (5, -3, 2**62, 5):
        hashes.add(value)
    hashes.seal()
    assert 5 in hashes
    assert -3 in hashes
    assert 2**62 in hashes
    assert 4 not in hashes
    assert "5" not in hashes
    assert len(hashes) == 4
    origins = Origins("dlq")
    origins.add(0, 10)
    origins.add(2, 1)
    origins.seal()
    assert origins.redriven(0, 10)
    assert origins.redriven(2, 1)
    assert not origins.redriven(1, 10)
    assert not origins.redriven(0, 11)


def test_unrouted_children_and_failures() -> None:
    added, failures = Hashes(), Hashes()
    added.add(child_key("gw", "a"))
    added.add(child_key("other", "b"))  # another gateway's child b
    failures.add(failed_key("gw", "e1", "f1"))
    added.seal()
    failures.seal()
    assert unrouted("gw", "e1", ["a"], ["f1"], added=added, failures=failures) == ([], [])
    lost = unrouted("gw", "e1", ["a", "b"], ["f1", "f2"], added=added, failures=failures)
    assert lost == (["b"], ["f2"])
    assert unrouted("gw", "e2", [], ["f1"], added=added, failures=failures) == ([], ["f1"])


def gap(kind: str, at: str, offset: int = 0) -> Gap:
    return Gap(
        kind=kind,  # type: ignore[arg-type]
        topic="t",
        partition=0,
        offset=offset,
        key="k",
        at=at,
        waiting_s=None,
        trace_id="-",
        detail="",
    )


def test_listing_is_by_kind_oldest_first_and_limited() -> None:
    gaps = [gap("duplicate", "3"), gap("missing", "2"), gap("missing", "1"), gap("missing", "0")]
    listed = older_first(gaps, 2)
    assert [(g.kind, g.at) for g in listed] == [
        ("missing", "0"),
        ("missing", "1"),
        ("duplicate", "3"),
    ]


def test_the_promise_holds_unless_missing_duplicate_or_unrouted() -> None:
    def report(**counts: int) -> Report:
        every = {"missing": 0, "duplicate": 0, "dead-lettered": 0, "unrouted": 0}
        return Report(
            since="x", until=None, children=1, deleted=0, events=0,
            counts=every | counts, oldest_missing_s=0.0, gaps=[], limit=1,
        )  # fmt: skip

    assert report().holds
    assert report(**{"dead-lettered": 3}).holds  # an outcome: waiting for the operator
    assert not report(missing=1).holds
    assert not report(duplicate=1).holds
    assert not report(unrouted=1).holds
