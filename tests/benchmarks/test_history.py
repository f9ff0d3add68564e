"""`python -m benchmarks --history N` with a tiny N: a consistent history, traced and cleaned up.

No timing thresholds: the 5 s target is judged in the bench's own output.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import msgspec
import orjson
import pytest

from benchmarks import history
from pipeline.io import kafka
from pipeline.tools.console import make_console
from tests.harness import read_topic

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.config import Config

pytestmark = pytest.mark.services


async def test_the_history_is_consistent_and_every_child_is_where_its_key_says(
    cfg: Config,
) -> None:
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, t.all())
    n = 300
    filled = await history.fill(cfg, n, int(time.time() * 1000) - 60_000)
    outcomes = sum(history.has_outcome(i, k) for i in range(n) for k in (0, 1))
    assert filled["records"] == {
        t.down_events: n, t.added: 2 * n, t.failed: n, t.allocations: n,
        t.allocations_dlq: outcomes - n,
    }  # fmt: skip
    assert filled["gaps"] == 2 * n - outcomes == 0  # the first gap is child 100,002
    added = {r.key for r in await read_topic(cfg.kafka, t.added, expect=2 * n)}
    done = [
        json.loads(r.value)["device_id"]
        for topic in (t.allocations, t.allocations_dlq)
        for r in await read_topic(cfg.kafka, topic)
    ]
    assert sorted(d.encode() for d in done) == sorted(added)  # each child one outcome
    for topic in (t.down_events, t.added, t.failed, t.allocations, t.allocations_dlq):
        for record in await read_topic(cfg.kafka, topic):
            assert record.key is not None
            assert record.partition == kafka.partition_of(record.key, cfg.kafka.partitions)
            assert dict(record.headers)["traceparent"].startswith(b"00-")


async def test_history_run_measures_trace_and_leaves_nothing(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(history, "RUNS", 1)
    summary = tmp_path / "summary-history.json"
    with (tmp_path / "out.txt").open("w") as printed:
        console = make_console(file=printed)
        done = await history.run(cfg, 200, config_path=None, summary=summary, console=console)
    assert done == 0, (tmp_path / "out.txt").read_text()
    doc = orjson.loads(summary.read_bytes())
    measured = doc["history"]
    assert measured["fill"]["events"] == 200
    cases = {c["case"]: c for c in measured["trace"]}
    assert "--sn, allocated, mid" in cases
    assert "--sn, allocated, mid, window" in cases
    for case in cases.values():
        assert case["exits"] == [case["expected_exit"]], case
        assert case["median_s"] > 0
        assert case["peak_rss_mb"] > 0
    assert cases["--sn, allocated, mid"]["records_found"] == [
        f"sn {history.child_sn(100, 0)}: 3 records"
    ]
    audit = measured["audit"]
    assert audit["available"] is True
    assert audit["exit"] == audit["expected_exit"] == 0, audit  # no gap among 200 events
    assert audit["children"] == 2 * 200
    # Each event's second child was refused by DPS: dead-lettered, an outcome all the same.
    assert audit["counts"] == {"missing": 0, "duplicate": 0, "dead-lettered": 200, "unrouted": 0}
    async with kafka.admin(cfg.kafka) as client:
        left = [name for name in await client.list_topics() if ".history." in name]
    assert left == []
    assert msgspec.json.decode(summary.read_bytes())["history"]["trace_target_s"] == 5.0
