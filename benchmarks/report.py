"""The bench's results: one JSON document, its summary, and the tables and chart drawn from that.

Every figure is a median with its min-max range over the rounds; a ratio is the stage's
median over its ceiling's median (the per-round ratios are kept too). The issue's targets
are judged here, in the output, never in a test. The document holds every end-to-end
latency measured (megabytes); :func:`summary` is the same without them, a few kilobytes,
which is what the tables, the chart and ``benchmarks/results/`` hold.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import orjson
from rich.table import Table

from benchmarks.latency import percentile
from benchmarks.stages import STAGES

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from benchmarks.latency import E2E
    from benchmarks.stages import Sample

__all__ = ["TARGETS", "chart", "document", "summary", "table"]

RSS_LIMIT_MB = 150.0
TARGETS = {
    ("decode", "msgspec typed decode"): 0.9,
    ("ingest", "in-order"): 0.95,
    ("ingest", "drain"): 0.6,
    ("route", "transactional"): 0.8,
    ("sink", "kiko"): 0.9,
    ("sink", "aiohttp"): 0.6,
}
"""Least acceptable ratio of a stage to each of its ceilings (issue 18). A ceiling without
one (ingest's naive loop, which acknowledges out of order as MQTT forbids) is shown, not
judged."""
CPU_TARGETS = {("sink", "aiohttp"): 1.4}
"""Most CPU per unit a stage may spend, as a multiple of a ceiling's (medians)."""
LATENCY_FRACTION = 0.5
LATENCY_TARGETS = {"p50": 60.0, "p99": 200.0}
"""Milliseconds, at :data:`LATENCY_FRACTION` of the sustained rate."""


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": values,
    }


def _target(what: str, value: float | None, target: str, met: bool | None) -> dict[str, Any]:
    return {"what": what, "value": value, "target": target, "met": met}


def _cpu_target(
    stage: str, kind: str, measures: dict[str, dict[str, Any]], most: float
) -> dict[str, Any]:
    """CPU per unit of the stage over the ceiling ``kind``'s (medians of the rounds)."""
    own = [v for v in measures["stage"]["cpu_us_per_unit"] if v is not None]
    other = [v for v in measures[kind]["cpu_us_per_unit"] if v is not None]
    what = f"{stage}: CPU per unit, stage / {kind}"
    if not own or not other:
        return _target(what, None, f"<= {most:g}", None)
    ratio = statistics.median(own) / statistics.median(other)
    return _target(what, ratio, f"<= {most:g}", ratio <= most)


def _stage(
    stage: str,
    unit: str,
    kinds: tuple[str, ...],
    measured: dict[str, list[Sample]],
    targets: list[dict[str, Any]],
) -> dict[str, Any]:
    """One stage's figures against each of its ceilings; its targets appended to ``targets``."""
    stage_rates = [s.rate for s in measured["stage"]]
    entry: dict[str, Any] = {"unit": unit, "measures": {}, "ratios": {}, "round_ratios": {}}
    for kind in kinds:
        rates = [s.rate for s in measured[kind]]
        entry["measures"][kind] = _summary(rates) | {
            "counts": [s.count for s in measured[kind]],
            "seconds": [s.seconds for s in measured[kind]],
            "cpu": [s.cpu for s in measured[kind]],
            # CPU per unit depends little on how much of a core the process got.
            "cpu_us_per_unit": [
                None if s.cpu is None else s.cpu / s.rate * 1e6 for s in measured[kind]
            ],
        }
        if kind == "stage":
            entry["measures"][kind]["peak_mb"] = [s.peak_mb for s in measured[kind]]
            continue
        ratio = statistics.median(stage_rates) / statistics.median(rates)
        entry["ratios"][kind] = ratio
        entry["round_ratios"][kind] = [a / b for a, b in zip(stage_rates, rates, strict=True)]
        if (least := TARGETS.get((stage, kind))) is not None:
            what = f"{stage}: stage / {kind}"
            targets.append(_target(what, ratio, f">= {least}", ratio >= least))
        if (most := CPU_TARGETS.get((stage, kind))) is not None:
            targets.append(_cpu_target(stage, kind, entry["measures"], most))
    return entry


def document(
    meta: dict[str, Any],
    decode: dict[str, list[float]],
    samples: dict[str, dict[str, list[Sample]]],
    e2e: E2E | None,
) -> dict[str, Any]:
    """Everything measured, summarised, with the targets judged."""
    targets: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"meta": meta}
    (own, own_v), (ceiling, ceiling_v) = decode.items()
    ratio = statistics.median(own_v) / statistics.median(ceiling_v)
    doc["decode"] = {
        "unit": "msg/CPU-s",
        "measures": {own: _summary(own_v), ceiling: _summary(ceiling_v)},
        "ratios": {ceiling: ratio},
        "round_ratios": {ceiling: [a / b for a, b in zip(own_v, ceiling_v, strict=True)]},
    }
    least = TARGETS["decode", ceiling]
    targets.append(_target(f"decode: {own} / {ceiling}", ratio, f">= {least}", ratio >= least))
    doc["stages"] = {}
    measured = [stage for stage in STAGES if samples[stage]["stage"]]  # --only leaves some out
    for stage in measured:
        unit, kinds = STAGES[stage]
        doc["stages"][stage] = _stage(stage, unit, kinds, samples[stage], targets)
    memory: dict[str, dict[str, float | None]] = {
        stage: {"rounds_peak_mb": max(s.peak_mb or 0.0 for s in samples[stage]["stage"])}
        for stage in measured
    }
    if e2e is None:
        for name, limit in LATENCY_TARGETS.items():
            what = f"e2e {name} at {LATENCY_FRACTION:g} x sustained, ms"
            targets.append(_target(what, None, f"<= {limit:g}", None))
    else:
        doc["e2e"] = _e2e(e2e, targets)
        for stage, mem in e2e.sustained_memory.items():
            memory.setdefault(stage, {})["sustained_peak_mb"] = mem.peak_mb
        if e2e.burst is not None:
            for stage, mem in e2e.burst.memory.items():
                memory.setdefault(stage, {})["burst_peak_mb"] = mem.peak_mb
                memory[stage]["burst_rss_after_mb"] = mem.now_mb
    doc["memory"] = memory
    for stage, figures in memory.items():
        peak = max(v for k, v in figures.items() if k.endswith("peak_mb") and v is not None)
        targets.append(
            _target(f"{stage}: peak RSS, MB", peak, f"<= {RSS_LIMIT_MB:g}", peak <= RSS_LIMIT_MB)
        )
    doc["targets"] = targets
    return doc


def _percentiles(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_p50_ms": None, f"{name}_p99_ms": None}
    return {f"{name}_p50_ms": percentile(values, 50), f"{name}_p99_ms": percentile(values, 99)}


def _e2e(e2e: E2E, targets: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [
        {
            "fraction": step.fraction,
            "offered_msg_per_s": statistics.median(step.offered),
            "offered_rounds": step.offered,
            "messages": sum(step.messages),
            "p50_ms": step.p50,
            "p99_ms": step.p99,
            "round_p50_ms": [percentile(values, 50) for values in step.latencies_ms],
            "round_p99_ms": [percentile(values, 99) for values in step.latencies_ms],
            # The second clock (arrival at a consumer) and the first hop (ingest's output).
            **_percentiles("receipt", [v for r in step.receipts_ms for v in r]),
            **_percentiles("ingest", [v for r in step.landed_ms for v in r]),
            **_percentiles("route", [v for r in step.routed_ms for v in r]),
            **_percentiles("committed", [v for r in step.committed_ms for v in r]),
            "latencies_ms": step.pooled,
        }
        for step in e2e.steps
    ]
    judged = [step for step in e2e.steps if step.fraction == LATENCY_FRACTION]
    for name, limit in LATENCY_TARGETS.items():
        value: float | None = None
        if judged:
            value = judged[0].p50 if name == "p50" else judged[0].p99
        targets.append(
            _target(
                f"e2e {name} at {LATENCY_FRACTION:g} x sustained, ms",
                value,
                f"<= {limit:g}",
                None if value is None else value <= limit,
            )
        )
    out: dict[str, Any] = {"sustained_msg_per_s": e2e.sustained, "children_per_message": 4}
    out["steps"] = steps
    if e2e.burst is not None:
        b = e2e.burst
        out["burst"] = {
            "messages": b.messages,
            "wanted": b.wanted,
            "published_seconds": b.published_seconds,
            "landed": b.landed,
            "landed_seconds": b.landed_seconds,
            "routed": b.routed,
            "allocated": b.allocated,
            "seconds": b.seconds,
        }
    return out


def versions(
    ref: str, commit: str, rates: dict[str, list[float]], targets: list[dict[str, Any]]
) -> dict[str, Any]:
    """The sustained rate of this checkout against ``ref``'s; its target (higher) appended."""
    ratio = statistics.median(rates["current"]) / statistics.median(rates["baseline"])
    what = f"e2e sustained rate / {ref}'s (same run)"
    targets.append(_target(what, ratio, "> 1", ratio > 1))
    return {
        "ref": ref,
        "commit": commit,
        "unit": "msg/s",
        "measures": {who: _summary(values) for who, values in rates.items()},
        "ratio": ratio,
    }


def save(console: Console, path: Path, data: dict[str, Any], what: str = "figures") -> None:
    """Write ``data`` as indented JSON to ``path`` (its directory made if need be); say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    console.print(f"{what} written to {path}")


def policy(rates: dict[str, list[float]]) -> dict[str, Any]:
    """The sustained rate on the policy's Mosquitto against one saving every second.

    Not a target: what the persistence policy (deploy/mosquitto/persistence.conf) costs a
    backlog on this machine, for the operator weighing it (deploy/README.md).
    """
    ratio = statistics.median(rates["policy"]) / statistics.median(rates["every second"])
    return {
        "unit": "msg/s",
        "measures": {who: _summary(values) for who, values in rates.items()},
        "ratio": ratio,
    }


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without the per-child latencies: each end-to-end step keeps their count."""
    if "e2e" not in doc:
        return doc
    steps = [
        {k: v for k, v in step.items() if k != "latencies_ms"}
        | {"children": len(step["latencies_ms"])}
        if "latencies_ms" in step
        else step  # a summary already
        for step in doc["e2e"]["steps"]
    ]
    return doc | {"e2e": doc["e2e"] | {"steps": steps}}


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def table(console: Console, doc: dict[str, Any]) -> None:
    """Print the results (a :func:`summary`): throughput, latency, memory, targets."""
    console.print(_throughput(doc))
    if "e2e" in doc:
        console.print(_latency(doc["e2e"]))
    console.print(_memory(doc["memory"]))
    if "baseline" in doc:
        v = doc["baseline"]
        console.print(
            _sustained(
                "end-to-end sustained rate",
                ("this checkout", v["measures"]["current"]),
                (f"{v['ref']} ({v['commit'][:10]})", v["measures"]["baseline"]),
                v["ratio"],
            )
        )  # fmt: skip
    if "policy" in doc:
        v = doc["policy"]
        line = _sustained(
            "the persistence policy's cost, end-to-end sustained rate",
            ("Mosquitto saving after every change", v["measures"]["policy"]),
            ("saving every second", v["measures"]["every second"]),
            v["ratio"],
        )  # fmt: skip
        console.print(f"{line} (every other figure: saving every second)")
    if "burst" in doc.get("e2e", {}):
        b = doc["e2e"]["burst"]
        landed = (
            f"all landed by ingest in {b['landed_seconds']:.0f} s"
            if b["landed_seconds"] is not None
            else f"{b['landed']:,} landed by ingest within the time limit"
        )
        wanted = b.get("wanted", b["messages"])
        taken = (
            ""
            if b["messages"] >= wanted
            else f" (of {wanted:,} asked for: the broker took no more within the time limit)"
        )
        console.print(
            f"burst: {b['messages']:,} messages published while the workers ran{taken}, "
            f"{landed}; "
            f"memory read {b['seconds']:.0f} s after "
            f"the first publish, when the router had routed {b['routed']:,} of them and the "
            f"sink allocated {b['allocated']:,} of {b['messages'] * 4:,} children"
        )
    console.print(_targets(doc["targets"]))
    for stage, summary in doc.get("profiles", {}).items():
        console.print(_profile(stage, summary))


def _sustained(
    what: str, one: tuple[str, dict[str, Any]], other: tuple[str, dict[str, Any]], ratio: float
) -> str:
    """A line comparing two sustained rates (name, measures) measured in interleaved rounds."""

    def figure(name: str, m: dict[str, Any]) -> str:
        # Escaped: rich markup reads a lowercase [word] as a style and drops it.
        return f"{name} {_rate(m['median'])} \\[{_rate(m['min'])}-{_rate(m['max'])}] msg/s"

    return (
        f"{what}, medians of {len(one[1]['samples'])} interleaved rounds \\[min-max]: "
        f"{figure(*one)}, {figure(*other)}: ratio {ratio:.2f}"
    )


def _throughput(doc: dict[str, Any]) -> Table:
    rounds = doc["meta"]["options"]["rounds"]
    # Escaped: rich markup reads a lowercase [word] as a style and drops it.
    t = Table(title=f"throughput: medians of {rounds} interleaved rounds, \\[min-max]")
    t.add_column("measure")
    for column in ("median", "range", "ratio", "CPU of a core", "CPU µs per unit"):
        t.add_column(column, justify="right")
    for stage, entry in [("decode", doc["decode"]), *doc["stages"].items()]:
        for i, (kind, summary) in enumerate(entry["measures"].items()):
            ratio = entry["ratios"].get(kind)
            label = (
                f"{stage if stage != 'decode' else kind} ({entry['unit']})"
                if i == 0
                else f"  ceiling: {kind}"
            )
            t.add_row(
                label,
                _rate(summary["median"]),
                f"[{_rate(summary['min'])}-{_rate(summary['max'])}]",
                f"{ratio:.2f}" if ratio is not None else "",
                _median(summary.get("cpu"), "{:.0%}"),
                _median(summary.get("cpu_us_per_unit"), "{:,.0f}"),
            )
    return t


def _median(values: list[float | None] | None, form: str) -> str:
    known = [v for v in values or () if v is not None]
    return form.format(statistics.median(known)) if known else ""


def _latency(e2e: dict[str, Any]) -> Table:
    sustained = e2e["sustained_msg_per_s"]
    # Escaped: rich markup reads a lowercase [word] as a style and drops it.
    t = Table(
        title=f"end to end, 4 children per message: sustained {sustained:,.0f} msg/s; "
        "latency of all rounds \\[each round's]"
    )
    columns = ("offered load", "msg/s", "children", "p50 ms", "p99 ms")
    for column in (
        *columns,
        "receipt p50/p99",
        "ingest p50/p99",
        "route p50/p99",
        "committed p50/p99",
    ):
        t.add_column(column, justify="right")
    for step in e2e["steps"]:
        t.add_row(
            f"{step['fraction']:g} x",
            _rate(step["offered_msg_per_s"]),
            f"{step['children']:,}",
            f"{_rate(step['p50_ms'])} [{', '.join(map(_rate, step['round_p50_ms']))}]",
            f"{_rate(step['p99_ms'])} [{', '.join(map(_rate, step['round_p99_ms']))}]",
            _pair(step, "receipt"),
            _pair(step, "ingest"),
            _pair(step, "route"),
            _pair(step, "committed"),
        )
    t.caption = (
        "p50/p99: publish -> the allocation record's broker append time; receipt: publish "
        "-> its arrival at a consumer of the allocations topic (this host's clock); ingest: "
        "publish -> the down event's append time (the MQTT broker and ingest); route: "
        "publish -> the added record's append time (before its transaction commits); "
        "committed: publish -> its arrival at a read-committed consumer (after the commit)"
    )
    return t


def _pair(step: dict[str, Any], name: str) -> str:
    p50, p99 = step.get(f"{name}_p50_ms"), step.get(f"{name}_p99_ms")
    if p50 is None or p99 is None:
        return "-"
    return f"{_rate(p50)}/{_rate(p99)}"


def _memory(memory: dict[str, dict[str, float]]) -> Table:
    t = Table(title="peak RSS per worker process, MB (VmHWM)")
    t.add_column("worker")
    columns = {
        "rounds_peak_mb": "throughput rounds",
        "sustained_peak_mb": "e2e sustained",
        "burst_peak_mb": "burst",
        "burst_rss_after_mb": "RSS after burst",
    }
    for title in columns.values():
        t.add_column(title, justify="right")
    for stage, figures in memory.items():
        t.add_row(stage, *(f"{figures[c]:.0f}" if c in figures else "-" for c in columns))
    return t


def _targets(targets: list[dict[str, Any]]) -> Table:
    t = Table(title="targets")
    for column in ("target", "value", "wanted", "met"):
        t.add_column(column)
    verdicts = {None: "not measured", True: "[green]met[/green]", False: "[red]not met[/red]"}
    for target in targets:
        value = target["value"]
        t.add_row(
            target["what"],
            "-" if value is None else f"{value:,.2f}",
            target["target"],
            verdicts[target["met"]],
        )
    return t


def _profile(stage: str, summary: dict[str, Any]) -> Table:
    t = Table(title=f"{stage}: py-spy, {summary['samples']:,} samples of busy time")
    for column in ("own time", "%", "including callees", "% "):
        t.add_column(column, justify="right" if column.startswith("%") else "left")
    for (own, own_share), (inc, inc_share) in zip(
        summary["own"], summary["inclusive"], strict=False
    ):
        t.add_row(own, f"{own_share:.1%}", inc, f"{inc_share:.1%}")
    return t


def chart(doc: dict[str, Any], path: Path) -> None:
    """Two panels of a :func:`summary`: each stage against its ceilings; latency against load."""
    import matplotlib as mpl  # noqa: PLC0415  (slow to import; only for the chart)

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(3, 2))
    groups = [("decode", doc["decode"]), *doc["stages"].items()]
    colours = ("#1f6fb4", "#6f6f6f", "#9a9a9a", "#c8c8c8")
    for g, (_, entry) in enumerate(groups):
        kinds = list(entry["measures"])
        width = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            s = entry["measures"][kind]
            x = g + (k - (len(kinds) - 1) / 2) * width
            err = [[s["median"] - s["min"]], [s["max"] - s["median"]]]
            label = "stage" if k == 0 else f"ceiling {k}"
            left.bar(x, s["median"], width, color=colours[k], yerr=err, capsize=3,
                     label=label if g == 1 else None)  # fmt: skip
            left.annotate(kind, (x, s["min"] * 0.9), ha="center", va="top", fontsize=7,
                          rotation=90)  # fmt: skip
        ratios = "\n".join(f"{r:.2f} of {kind}" for kind, r in entry["ratios"].items())
        top = max(m["max"] for m in entry["measures"].values())
        left.annotate(ratios, (g, top * 1.15), ha="center", fontsize=8)
    left.set_yscale("log")
    left.set_xticks(range(len(groups)), [f"{s}\n({e['unit']})" for s, e in groups])
    left.set_ylabel("throughput (log scale), median with min-max")
    left.set_title("each stage against its ceilings (ratio = stage / ceiling)")
    left.legend(loc="lower left", fontsize=8)
    if "e2e" in doc:
        e = doc["e2e"]
        offered = [step["offered_msg_per_s"] for step in e["steps"]]
        for name, style in (("p50", "o-"), ("p99", "s--")):
            values = [step[f"{name}_ms"] for step in e["steps"]]
            rounds = [step[f"round_{name}_ms"] for step in e["steps"]]
            err = [
                [v - min(r) for v, r in zip(values, rounds, strict=True)],
                [max(r) - v for v, r in zip(values, rounds, strict=True)],
            ]
            right.errorbar(offered, values, yerr=err, fmt=style, capsize=3, label=f"{name}")
        for name, limit in LATENCY_TARGETS.items():
            right.axhline(limit, color="grey", linewidth=0.8, linestyle=":")
            right.annotate(
                f"{name} target {limit:g} ms", (offered[0], limit), fontsize=7, va="bottom"
            )
        right.axvline(e["sustained_msg_per_s"], color="#b44", linewidth=0.8)
        right.annotate("sustained", (e["sustained_msg_per_s"], right.get_ylim()[1]), fontsize=7,
                       color="#b44", ha="right", va="top", rotation=90)  # fmt: skip
        right.set_yscale("log")
        right.set_xlabel("offered load, messages/s (4 children each)")
        right.set_ylabel("publish -> allocation record, ms (log scale)")
        right.set_title("end-to-end latency against offered load (bars: each round)")
        right.legend(fontsize=8)
    meta = doc["meta"]
    start, end = meta["loadavg_start"][0], meta["loadavg_end"][0]
    fig.suptitle(
        f"benchmarks, {meta['started_at']} - {meta['cpus']} shared cores, load average "
        f"{start:.1f} at the start, {end:.1f} at the end; "
        f"{meta['options']['rounds']} interleaved rounds"
        + (f"\nMosquitto: {meta['mosquitto']}" if meta.get("mosquitto") else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
