"""``pipeline bench``: throughput of each stage and of the decoder, with baselines beside them.

Every figure is the median of ``runs`` repetitions made in this one process, next to a
baseline measured the same way in the same run, so the ratios hold even when the
machine's absolute speed wanders:

- decode: :func:`decode_down` (validating) against stdlib ``json.loads`` (not validating);
- ingest: MQTT -> Kafka messages/s, manual ack after ``acks=all``;
- route: children/s through Kafka transactions;
- sink: DPS allocations/s against the emulator at ``sink.concurrency`` against one at a time.

The process's peak RSS (all stages and the emulator together) is reported at the end.
"""

from __future__ import annotations

import asyncio
import functools
import json
import resource
import statistics
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import orjson
from rich.console import Console
from rich.table import Table

from pipeline.core.decode import decode_down
from pipeline.dps.emulator import start_emulator
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink
from pipeline.tools.demo import demo_config
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import ensure_services

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.config import Config

__all__ = ["run"]


def _message(gateway: int, event: int, children: int) -> FixtureMessage:
    devices = [
        {
            "device_id": f"product_{gateway}-{event}-{c}",
            "node_id": f"sn-{gateway}-{event}-{c}",
            "product_id": "product",
            "name": f"child {c}",
            "status": "ONLINE",
            "extension_info": {"rated_kw": 5},
        }
        for c in range(children)
    ]
    payload = {
        "object_device_id": f"gw-{gateway}",
        "services": [
            {
                "service_id": "$sub_device_manager",
                "event_type": "add_sub_device_response",
                "event_time": "20261122T063000Z",
                "event_id": str(uuid.uuid4()),
                "paras": {"successful_devices": devices, "failed_devices": []},
            }
        ],
    }
    return FixtureMessage(
        topic=f"$oc/devices/gw-{gateway}/sys/events/down", payload=orjson.dumps(payload)
    )


def _decode_rate(payloads: list[bytes], decode: Callable[[bytes], object]) -> float:
    started = time.perf_counter()
    for payload in payloads:
        decode(payload)
    return len(payloads) / (time.perf_counter() - started)


async def _until(check: Callable[[], Any], limit: float = 300) -> None:
    async with asyncio.timeout(limit):
        while not await check():  # noqa: ASYNC110  (polling Kafka, not local state)
            await asyncio.sleep(0.05)


async def _pipeline_round(
    base: Config, dps_url: str, messages: int, children: int
) -> dict[str, float]:
    """One repetition: each stage alone, timed until it has nothing left to do."""
    run_id = f"bench-{uuid.uuid4().hex[:6]}"
    cfg = demo_config(base, run_id, dps_url)
    per_message = max(1, children // messages) if children >= messages else 1
    batch = [_message(i % 10, i, per_message if i < children else 0) for i in range(messages)]
    expected_children = sum(per_message if i < children else 0 for i in range(messages))
    out: dict[str, float] = {}
    t = cfg.kafka.topics

    health, stop = Health(), asyncio.Event()
    ingest = asyncio.create_task(Ingest(cfg, health).run(stop))
    await _until(functools.partial(_ready, health))
    started = time.perf_counter()
    await replay_messages(cfg.mqtt, batch, topic_prefix=f"demo/{run_id}/", progress=False)
    await _until(functools.partial(_at_least, cfg, t.down_events, messages))
    out["ingest msg/s"] = messages / (time.perf_counter() - started)
    stop.set()
    await ingest

    stop = asyncio.Event()
    started = time.perf_counter()
    router = asyncio.create_task(Router(cfg).run(stop))
    await _until(functools.partial(_zero_lag, cfg, cfg.router.group_id, t.down_events))
    out["route children/s"] = expected_children / (time.perf_counter() - started)
    stop.set()
    await router

    for label, concurrency, share in (("sink allocations/s", cfg.sink.concurrency, 1.0),
                                      ("sink allocations/s, one at a time", 1, 0.25)):  # fmt: skip
        sink_cfg = msgspec.structs.replace(
            cfg,
            sink=msgspec.structs.replace(
                cfg.sink, concurrency=concurrency, group_id=f"{cfg.sink.group_id}-{concurrency}"
            ),
        )
        count = int(expected_children * share)
        baseline = await kafka.size(cfg.kafka, t.allocations)
        stop = asyncio.Event()
        started = time.perf_counter()
        sink = asyncio.create_task(Sink(sink_cfg).run(stop))
        await _until(functools.partial(_at_least, cfg, t.allocations, baseline + count))
        out[label] = count / (time.perf_counter() - started)
        stop.set()
        await sink
    return out


async def _ready(health: Health) -> bool:
    return bool(health.report().get("ingest.mqtt"))


async def _at_least(cfg: Config, topic: str, n: int) -> bool:
    return await kafka.size(cfg.kafka, topic) >= n


async def _zero_lag(cfg: Config, group: str, topic: str) -> bool:
    return await kafka.backlog(cfg.kafka, group, topic) == 0


async def run(cfg: Config, *, messages: int, children: int, runs: int) -> int:
    """Run the benchmark and print medians and ratios."""
    console = Console(stderr=True)
    with console.status("checking Mosquitto and Kafka (starting deploy/local if need be)"):
        await ensure_services(cfg)
    sample = [_message(i % 10, i, 1 + i % 50).payload for i in range(2000)]
    decode: dict[str, list[float]] = {"decode_down (msgspec, validating)": [], "json.loads": []}
    for _ in range(max(runs, 5)):
        decode["decode_down (msgspec, validating)"].append(_decode_rate(sample, decode_down))
        decode["json.loads"].append(_decode_rate(sample, json.loads))
    stages: dict[str, list[float]] = {}
    async with await start_emulator(accept_any_sn=True) as emulator:
        for i in range(runs):
            console.print(f"round {i + 1}/{runs}: {messages} messages, {children} children")
            for key, value in (
                await _pipeline_round(cfg, emulator.url, messages, children)
            ).items():
                stages.setdefault(key, []).append(value)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _report(console, decode, stages, peak_mib, runs)
    return 0


def _report(
    console: Console,
    decode: dict[str, list[float]],
    stages: dict[str, list[float]],
    peak_mib: float,
    runs: int,
) -> None:
    table = Table(title=f"pipeline bench (medians of {runs} runs; min-max in brackets)")
    table.add_column("measure")
    table.add_column("median", justify="right")
    table.add_column("range", justify="right")
    for name, values in [*decode.items(), *stages.items()]:
        unit = " msg/s" if name.startswith(("decode", "json")) else ""
        table.add_row(
            name + unit,
            f"{statistics.median(values):,.0f}",
            f"[{min(values):,.0f}-{max(values):,.0f}]",
        )
    console.print(table)
    dec = [statistics.median(v) for v in decode.values()]
    console.print(f"decode_down / json.loads: {dec[0] / dec[1]:.2f}x")
    sink = [statistics.median(v) for k, v in stages.items() if k.startswith("sink")]
    if len(sink) == 2:  # noqa: PLR2004
        console.print(f"sink concurrency speed-up: {sink[0] / sink[1]:.1f}x")
    console.print(f"peak RSS of this process (three stages + emulator): {peak_mib:.0f} MiB")
