"""Tables printed off a terminal (a pipe, a log, CI) come out whole: no cell is cut."""

from __future__ import annotations

import io
from typing import Any

from rich.table import Table

from pipeline.tools import status
from pipeline.tools.bench import replicas, report
from pipeline.tools.console import PIPE_WIDTH, make_console

# Wider than rich's 80-column fallback, in cells that have no space to wrap at.
RANGES = [f"[{n:,}-{n + 601:,}]" for n in range(5_109, 5_109 + 9 * 1_000, 1_000)]
LONG = "x" * 150


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _render(*renderables: Any) -> str:
    out = io.StringIO()
    console = make_console(file=out)
    for renderable in renderables:
        console.print(renderable)
    return out.getvalue()


def test_a_wide_table_is_whole_off_a_terminal() -> None:
    table = Table(title="wide")
    for i in range(len(RANGES)):
        table.add_column(f"round {i}")
    table.add_column("note")
    table.add_row(*RANGES, LONG)
    text = _render(table)
    assert "…" not in text
    for value in [*RANGES, LONG]:
        assert value in text
    assert max(map(len, text.splitlines())) > 80
    # A table takes only the columns it needs, however wide the Console.
    assert max(map(len, text.splitlines())) < 400


def test_stderr_and_stdout_consoles_are_wide_off_a_terminal() -> None:
    # pytest captures both streams, so neither is a terminal here.
    assert make_console().width == PIPE_WIDTH
    assert make_console(stderr=True).width == PIPE_WIDTH


def test_a_terminal_keeps_its_width() -> None:
    console = make_console(file=_Tty())
    assert console.is_terminal
    assert console.width != PIPE_WIDTH


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
                    "latencies_ms": [1.0] * 4,
                    "p50_ms": 12.0,
                    "round_p50_ms": [11.0, 12.0, 13.0],
                    "p99_ms": 150.0,
                    "round_p99_ms": [140.0, 150.0, 160.0],
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


def test_a_workers_own_words_are_printed_as_they_are() -> None:
    # A /readyz detail (a worker's, DPS's words) with brackets is text, not rich markup.
    detail = "DPS code 1003 [signature] (check [bold]sink.dps.app_secret[/bold])"
    table = status._health_table(
        {"http://127.0.0.1:9103": {"ready": False, "checks": {"sink.dps": False},
                                   "details": {"sink.dps": detail}}}
    )  # fmt: skip
    assert detail in _render(table)
