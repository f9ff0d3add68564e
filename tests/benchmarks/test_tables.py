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
