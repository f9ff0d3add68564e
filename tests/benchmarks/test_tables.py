"""The bench's tables printed off a terminal (a pipe, a log, CI) come out whole."""

from __future__ import annotations

import io
from typing import Any

from benchmarks import replicas, report
from pipeline.tools.console import make_console


def _summary(median: float, low: float, high: float) -> dict[str, Any]:
    return {"median": median, "min": low, "max": high, "cpu": [0.97], "cpu_us_per_unit": [1234.5]}


def test_the_bench_tables_are_whole() -> None:
    measures = {"stage": _summary(5_109_000, 5_101_000, 5_710_000)}
    measures |= {f"ceiling {i}": _summary(6_000_000, 5_900_000, 6_100_000) for i in range(3)}
    doc = {
        "meta": {"options": {"rounds": 5}},
        "decode": {
            "unit": "msg/CPU-s",
            "measures": {"msgspec typed decode": measures["stage"]},
            "ratios": {},
        },
        "stages": {
            "ingest": {
                "unit": "msg/s",
                "measures": measures,
                "ratios": {f"ceiling {i}": 0.85 for i in range(3)},
            }
        },
        "e2e": {
            "sustained_msg_per_s": 5_109.0,
            "steps": [
                {
                    "fraction": 0.5,
                    "offered_msg_per_s": 2_554.0,
                    "children": 4,
                    "p50_ms": 12.0,
                    "round_p50_ms": [11.0, 12.0, 13.0],
                    "p99_ms": 150.0,
                    "round_p99_ms": [140.0, 150.0, 160.0],
                    "receipt_p50_ms": 14.0,
                    "receipt_p99_ms": 152.0,
                    "ingest_p50_ms": 3.0,
                    "ingest_p99_ms": 9.0,
                    "route_p50_ms": 7.0,
                    "route_p99_ms": 80.0,
                }
            ],
        },
        "memory": {"ingest": {"rounds_peak_mb": 61.0}},
        "targets": [
            {"what": "ingest: stage / naive", "value": 0.85, "target": ">= 1", "met": False}
        ],
    }
    out = io.StringIO()
    report.table(make_console(file=out), doc)
    text = out.getvalue()
    assert "…" not in text
    assert "[5,101,000-5,710,000]" in text
    assert "[5,900,000-6,100,000]" in text
    assert "interleaved rounds, [min-max]" in text
    # A title wider than its table wraps (whole words, nothing dropped).
    assert "latency of all rounds [each round's]" in " ".join(text.split())
    assert "150 [140, 150, 160]" in text
    assert "14/152" in text  # the second clock, and each hop
    assert "3/9" in text
    assert "7/80" in text
    assert "not met" in text


def test_the_bench_replica_table_is_whole() -> None:
    counts = {
        str(n): {"median": 5_109_000 * n, "min": 5_101_000 * n, "max": 5_710_000 * n}
        | {"speedup": float(n), "peak_mb": 61.0}
        for n in (1, 2, 4)
    }
    doc = {
        "meta": {"options": {"rounds": 5}},
        "replicas": {
            "sink": {"unit": "children/s", "replicas": counts},
            "ingest": {"unit": "msg/s", "replicas": counts, "split": {"2": [0.5, 0.5]}},
        },
    }
    out = io.StringIO()
    replicas.table(make_console(file=out), doc)
    text = out.getvalue()
    assert "…" not in text
    assert "[20,404,000-22,840,000]" in text
    assert "interleaved rounds, [min-max]" in text


def test_only_some_stages_are_measured_and_judged() -> None:
    """``--only route``: the route figures and targets, none of the other stages'."""
    from benchmarks.cli import _parser  # noqa: PLC0415
    from benchmarks.stages import STAGES, Sample  # noqa: PLC0415

    assert _parser().parse_args(["--only", "route, sink"]).only == ("route", "sink")
    assert _parser().parse_args([]).only == ("ingest", "route", "sink")
    samples: dict[str, dict[str, list[Sample]]] = {
        stage: {kind: [] for kind in kinds} for stage, (_, kinds) in STAGES.items()
    }
    samples["route"]["stage"].append(Sample(8_000.0, 10_000, 1.25, peak_mb=90.0, cpu=0.9))
    samples["route"]["transactional"].append(Sample(10_000.0, 10_000, 1.0, cpu=0.8))
    decode = {"decode_down": [2.0e6], "msgspec typed decode": [2.5e6]}

    doc = report.document({"options": {"rounds": 1}}, decode, samples, None)

    assert list(doc["stages"]) == ["route"]
    assert doc["stages"]["route"]["ratios"] == {"transactional": 0.8}
    assert doc["memory"] == {"route": {"rounds_peak_mb": 90.0}}
    judged = [t["what"] for t in doc["targets"]]
    assert [w for w in judged if w.startswith(("ingest", "sink"))] == []
    assert "route: stage / transactional" in judged
    assert "route: peak RSS, MB" in judged
