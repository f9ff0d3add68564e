"""``pipeline status``: per stage, consumer lag, throughput and DLQ sizes."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from pipeline.io import kafka

if TYPE_CHECKING:
    from aiokafka import TopicPartition

    from pipeline.config import Config

__all__ = ["collect", "status"]

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


async def status(cfg: Config) -> int:
    """Print the table; exit code 0."""
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
    Console().print(table)
    return 0
