"""The bench (`python -m benchmarks`), run end to end with tiny sizes: the shape of its figures, not their values.

No timing thresholds here: the targets are judged in the bench's own output. What is
checked is that every stage and ceiling was measured on the input it was given, that
every figure is a positive number, that each ratio is the stage's median over its
ceiling's, and that the run leaves nothing behind on the shared brokers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks import Options, cli, replicas, report, run, runner, workload
from benchmarks.latency import percentile
from benchmarks.measure import LOG_APPEND_TIME, at_first, output_rate, rate
from benchmarks.stages import STAGES, CpuTrace
from pipeline.config import Config
from pipeline.io import kafka

TINY = Options(
    rounds=1,
    messages=200,
    events=50,
    allocations=120,
    decode_reps=2,
    sustain=60,
    rates=(0.5, 1.0),
    rate_seconds=0.5,
    latency_rounds=1,
    burst=200,
    burst_settle=0.2,
    limit=90.0,
)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _check_summary(summary: dict[str, Any], rounds: int) -> None:
    samples = summary["samples"]
    assert len(samples) == rounds
    assert all(_positive(v) for v in samples)
    assert summary["median"] == statistics.median(samples)
    assert summary["min"] == min(samples) <= summary["median"] <= max(samples) == summary["max"]


def _check_stages(doc: dict[str, Any]) -> None:
    expected_counts = {
        "ingest": TINY.messages,
        "route": TINY.events * workload.CHILDREN,
        "sink": TINY.allocations,
    }
    assert list(doc["stages"]) == list(STAGES)
    for stage, (unit, kinds) in STAGES.items():
        entry = doc["stages"][stage]
        assert entry["unit"] == unit
        assert list(entry["measures"]) == list(kinds)
        for kind in kinds:
            summary = entry["measures"][kind]
            _check_summary(summary, TINY.rounds)
            # Every stage and ceiling completed exactly the work it was given.
            assert summary["counts"] == [expected_counts[stage]] * TINY.rounds
            assert all(_positive(s) for s in summary["seconds"])
            # CPU shares: /proc counts in 10 ms ticks, so a tiny run may read 0.
            assert all(math.isfinite(cpu) and cpu >= 0 for cpu in summary["cpu"])
            assert all(math.isfinite(us) and us >= 0 for us in summary["cpu_us_per_unit"])
        assert all(_positive(mb) for mb in entry["measures"]["stage"]["peak_mb"])
        stage_median = entry["measures"]["stage"]["median"]
        assert set(entry["ratios"]) == set(kinds[1:])
        for kind, ratio in entry["ratios"].items():
            assert ratio == pytest.approx(stage_median / entry["measures"][kind]["median"])


def _check_policy(doc: dict[str, Any]) -> None:
    """Measured on the bench's own Mosquitto; the policy's cost on both, once per round each."""
    assert doc["meta"]["mosquitto"].startswith("the bench's own, saving every second")
    policy = doc["policy"]
    assert list(policy["measures"]) == ["every second", "policy"]
    for measured in policy["measures"].values():
        _check_summary(measured, TINY.rounds)
    medians = [m["median"] for m in policy["measures"].values()]
    assert policy["ratio"] == pytest.approx(medians[1] / medians[0])


@pytest.mark.services
async def test_bench_runs_end_to_end_and_reports_consistent_figures(
    cfg: Config, tmp_path: Path
) -> None:
    out, summary, chart = tmp_path / "bench.json", tmp_path / "summary.json", tmp_path / "bench.png"

    assert await run(cfg, TINY, out=out, summary=summary, chart=chart) == 0

    doc = orjson.loads(out.read_bytes())
    assert set(doc) == {"meta", "decode", "stages", "e2e", "memory", "targets", "policy"}
    _check_policy(doc)
    # The summary is every figure but the per-child latencies, whose count it keeps.
    brief = orjson.loads(summary.read_bytes())
    assert brief == report.summary(doc)
    assert [s["children"] for s in brief["e2e"]["steps"]] == [
        len(s["latencies_ms"]) for s in doc["e2e"]["steps"]
    ]
    assert b"latencies_ms" not in summary.read_bytes()
    assert doc["meta"]["options"]["rounds"] == 1

    decode = doc["decode"]
    assert list(decode["measures"]) == ["decode_down", "msgspec typed decode"]
    for summary in decode["measures"].values():
        _check_summary(summary, TINY.decode_reps)
    medians = [s["median"] for s in decode["measures"].values()]
    assert decode["ratios"]["msgspec typed decode"] == pytest.approx(medians[0] / medians[1])

    _check_stages(doc)

    e2e = doc["e2e"]
    assert _positive(e2e["sustained_msg_per_s"])
    assert [s["fraction"] for s in e2e["steps"]] == list(TINY.rates)
    for step in e2e["steps"]:
        assert len(step["latencies_ms"]) == step["messages"] * workload.CHILDREN
        assert len(step["round_p50_ms"]) == len(step["round_p99_ms"]) == TINY.latency_rounds
        assert all(_positive(v) for v in step["latencies_ms"])
        assert step["p50_ms"] == percentile(step["latencies_ms"], 50)
        assert step["p99_ms"] == percentile(step["latencies_ms"], 99)
        assert _positive(step["offered_msg_per_s"])
        # The second clock and the hops: every one measured, each hop before the end.
        for name in ("receipt", "ingest", "route"):
            assert _positive(step[f"{name}_p50_ms"])
            assert step[f"{name}_p50_ms"] <= step[f"{name}_p99_ms"]
        assert step["ingest_p50_ms"] <= step["p50_ms"] <= step["receipt_p50_ms"]
    burst = e2e["burst"]
    assert burst["messages"] == burst["wanted"] == burst["landed"] == TINY.burst

    assert set(doc["memory"]) == set(STAGES)
    for figures in doc["memory"].values():
        assert set(figures) == {
            "rounds_peak_mb", "sustained_peak_mb", "burst_peak_mb", "burst_rss_after_mb"
        }  # fmt: skip
        assert all(_positive(v) for v in figures.values())

    for target in doc["targets"]:
        assert _positive(target["value"])
        assert isinstance(target["met"], bool)
    # decode; ingest 2 ratios, route 1, sink 2 and its CPU per allocation; 2 latencies; 3 RSS
    assert [t["what"] for t in doc["targets"]][1:7] == [
        "ingest: stage / in-order",
        "ingest: stage / drain",
        "route: stage / transactional",
        "sink: stage / kiko",
        "sink: stage / aiohttp",
        "sink: CPU per unit, stage / aiohttp",
    ]
    assert len(doc["targets"]) == 1 + 6 + 2 + 3

    assert chart.read_bytes().startswith(b"\x89PNG")

    # Nothing left on the shared broker: every topic of the run is deleted.
    run_id = doc["meta"]["run_id"]
    client = kafka.admin(cfg.kafka)
    await client.start()
    try:
        left = [t for t in await client.list_topics() if t.startswith(f"bench.{run_id}.")]
    finally:
        await client.close()
    assert left == []


@pytest.mark.services
async def test_bench_replicas_measures_every_count_on_the_same_input(
    cfg: Config, tmp_path: Path
) -> None:
    out, summary = tmp_path / "replicas.json", tmp_path / "summary-replicas.json"
    options = dataclasses.replace(TINY, replicas=True, messages=100, allocations=80)

    assert await run(cfg, options, out=out, summary=summary) == 0

    doc = orjson.loads(out.read_bytes())
    assert orjson.loads(summary.read_bytes()) == doc  # nothing bulky to leave out
    assert set(doc) == {"meta", "replicas"}
    sink, ingest = doc["replicas"]["sink"], doc["replicas"]["ingest"]
    assert list(sink["replicas"]) == [str(n) for n in replicas.SINKS]
    assert list(ingest["replicas"]) == [str(n) for n in replicas.INGESTS]
    for entry in (sink, ingest):
        one = entry["replicas"]["1"]["median"]
        for figures in entry["replicas"].values():
            assert len(figures["rates"]) == options.rounds
            assert all(_positive(r) for r in figures["rates"])
            assert figures["speedup"] == pytest.approx(figures["median"] / one)
            assert _positive(figures["peak_mb"])
    # The gateways split between two ingest replicas covers every message once.
    assert sum(ingest["split"]["2"]) == options.messages
    assert ingest["split"]["1"] == [options.messages]
    assert all(share > 0 for share in ingest["split"]["2"])


def test_chart_without_matplotlib_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(runner, "chart_available", lambda: False)

    code = cli.main(["--chart", str(tmp_path / "x.png")])

    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "benchmarks: --chart needs matplotlib: pip install matplotlib"
    assert not (tmp_path / "x.png").exists()


def test_the_kept_summary_is_what_the_bench_writes(tmp_path: Path) -> None:
    # benchmarks/results/summary.json, read back as a run's figures, is written again
    # unchanged, and its tables and chart are drawn from it.
    kept = cli.RESULTS / "summary.json"
    summary, chart = tmp_path / "summary.json", tmp_path / "bench.png"

    assert cli.main(["--from", str(kept), "--summary", str(summary), "--chart", str(chart)]) == 0

    assert summary.read_bytes() == kept.read_bytes()
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert len(kept.read_bytes()) < 50_000
    replicas_kept = cli.RESULTS / "summary-replicas.json"
    summary = tmp_path / "summary-replicas.json"
    assert cli.main(["--from", str(replicas_kept), "--summary", str(summary)]) == 0
    assert summary.read_bytes() == replicas_kept.read_bytes()


def test_the_summary_keeps_the_count_of_the_latencies_it_leaves_out() -> None:
    step = {"fraction": 0.5, "p50_ms": 2.0, "p99_ms": 3.0, "latencies_ms": [1.0, 2.0, 3.0]}
    doc = {"meta": {}, "e2e": {"sustained_msg_per_s": 10.0, "steps": [step]}}

    brief = report.summary(doc)

    assert brief["e2e"]["steps"] == [{"fraction": 0.5, "p50_ms": 2.0, "p99_ms": 3.0, "children": 3}]
    assert report.summary(brief) == brief
    assert doc["e2e"]["steps"] == [step]  # the run's figures are left whole


def test_rate_and_percentile() -> None:
    assert rate(11, 100.0, 101.0) == 10.0
    assert rate(1, 5.0, 5.0) == 1000.0  # one completion: at most the clock's resolution
    # A first batch of 6 lands at once, after the work of all 6: only the 5 after it count.
    assert rate(11, 100.0, 101.0, at_first=6) == 5.0


def test_a_workers_cpu_is_read_over_the_span_of_its_output() -> None:
    trace = CpuTrace(proc=None)  # type: ignore[arg-type]  # samples given, none taken
    assert trace.busy(0.0, 1.0) is None
    # Busy for a second (0.9 CPU s), then idle while the bench polls and reads back.
    trace._samples = [(100.0 + t / 10, min(t, 10) * 0.09) for t in range(14)]
    assert trace.busy(100.0, 101.0) == pytest.approx(0.9)
    assert trace.busy(100.0, 101.3) == pytest.approx(0.9 / 1.3)  # the idle tail counted
    assert trace.busy(200.0, 201.0) == pytest.approx(0.9 / 1.3)  # no sample inside: all


def test_a_first_batch_is_left_out_of_the_rate() -> None:
    from aiokafka import ConsumerRecord  # noqa: PLC0415

    def record(ms: int) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord("t", 0, 0, ms, LOG_APPEND_TIME, b"k", b"v", None, 1, 1, [])

    batchy = [record(1000)] * 4 + [record(1500), record(2000)]
    assert at_first(batchy) == 4
    assert output_rate(batchy) == 2 / 1.0  # 2 records in the second after the first batch
    one_by_one = [record(1000 + 250 * i) for i in range(5)]
    assert at_first(one_by_one) == 1
    assert output_rate(one_by_one) == 4 / 1.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert percentile([7.0], 99) == 7.0
