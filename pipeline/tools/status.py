"""``pipeline status``: per stage, consumer lag, throughput and DLQ sizes; worker health.

Health is what each worker's ``/readyz`` says: failing checks with their reasons, such as
a DPS code and its hint, or an edge broker's bridge that is down.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from rich.markup import escape
from rich.table import Table

from pipeline.io import kafka
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from aiokafka import TopicPartition

    from pipeline.config import Config

__all__ = ["collect", "health", "status"]

SAMPLE = 2.0


async def collect(cfg: Config, sample: float = SAMPLE) -> list[dict[str, object]]:
    """One row per stage: group, records it has not committed, output records/s, DLQ size."""
    t = cfg.kafka.topics
    stages = [
        ("ingest", None, None, t.down_events, t.down_events_dlq),
        ("route", cfg.router.group_id, t.down_events, t.added, None),
        ("sink", cfg.sink.group_id, t.added, t.allocations, t.allocations_dlq),
    ]
    topics = [t.down_events, t.down_events_dlq, t.added, t.allocations, t.allocations_dlq]
    reader = kafka.consumer(cfg.kafka, group_id=None)
    async with reader:
        tps = await kafka.partitions(reader, *topics)
        first = await reader.end_offsets(tps)
        started = time.monotonic()
        await asyncio.sleep(sample)
        ends = await reader.end_offsets(tps)
        elapsed = time.monotonic() - started
        begins = await reader.beginning_offsets(tps)

    def total(topic: str, offsets: dict[TopicPartition, int]) -> int:
        return sum(v for tp, v in offsets.items() if tp.topic == topic)

    rows: list[dict[str, object]] = []
    for name, group, source, output, dlq in stages:
        rows.append(
            {
                "stage": name,
                "group": group or "-",
                "lag": await kafka.backlog(cfg.kafka, group, source) if group and source else None,
                "out_per_s": round((total(output, ends) - total(output, first)) / elapsed, 1),
                "dlq": total(dlq, ends) - total(dlq, begins) if dlq else None,
            }
        )
    return rows


async def health(cfg: Config, endpoints: list[str] | None = None) -> dict[str, Any]:
    """What each worker's ``/readyz`` says: ``{url: body}``, or ``{url: None}`` if silent.

    By default the workers of this configuration on this host (its metrics ports).
    """
    if endpoints is None:
        m = cfg.metrics
        host = "127.0.0.1" if m.host in ("0.0.0.0", "::") else m.host  # noqa: S104
        ports = (m.run_port, m.ingest_port, m.route_port, m.sink_port)
        endpoints = [f"http://{host}:{port}" for port in ports]
    found: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for url in endpoints:
            try:
                async with http.get(f"{url.rstrip('/')}/readyz") as response:
                    found[url] = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                found[url] = None
    return found


def _health_table(found: dict[str, Any]) -> Table:
    table = Table(title="workers (/readyz)")
    for column in ("worker", "ready", "check", "detail"):
        table.add_column(column)
    for url, body in found.items():
        if body is None:
            table.add_row(url, "-", "", "no worker answers")
            continue
        checks: dict[str, bool] = body.get("checks", {})
        details: dict[str, str] = body.get("details", {})
        ready = "yes" if body.get("ready") else "[red]no[/red]"
        notes = sorted(set(details) | {name for name, ok in checks.items() if not ok})
        if not notes:
            table.add_row(url, ready, "all checks pass", "")
        for i, name in enumerate(notes):
            state = "up" if checks.get(name) else "[red]down[/red]"
            table.add_row(
                url if i == 0 else "",
                ready if i == 0 else "",
                f"{escape(name)}: {state}",
                escape(details.get(name, "")),  # a worker's words: "[...]" is not markup
            )
    return table


async def status(cfg: Config, endpoints: list[str] | None = None) -> int:
    """Print the tables; exit code 0."""
    rows = await collect(cfg)
    table = Table(title=f"iot-pipeline @ {cfg.kafka.bootstrap_servers}")
    for column in ("stage", "group", "lag", "out/s", "DLQ records"):
        table.add_column(column, justify="left" if column in ("stage", "group") else "right")
    for row in rows:
        table.add_row(
            str(row["stage"]),
            str(row["group"]),
            "-" if row["lag"] is None else str(row["lag"]),
            str(row["out_per_s"]),
            "-" if row["dlq"] is None else str(row["dlq"]),
        )
    console = make_console()
    console.print(table)
    found = await health(cfg, endpoints)
    if any(body is not None for body in found.values()) or endpoints:
        console.print(_health_table(found))
    else:
        console.print("no worker answers /readyz on this host's metrics ports (--endpoint URL)")
    return 0
