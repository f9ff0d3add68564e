"""``pipeline demo``: the whole flow on this machine, once, with a summary at the end.

In a checkout it runs on a Mosquitto and a Kafka of its own (:func:`own_brokers`: free
ports, removed afterwards), so it never touches a broker it did not start; from an
installed wheel or an image, on the configured ones, where it removes what it created
(its topics, consumer groups and MQTT session) once it has printed the summary. It
brings up the DPS emulator and the three stages, replays a realistic fixture (several
gateways, failed children, an sn DPS does not know, one whose group is missing, a
malformed message, a redelivery), waits until every stage is idle and prints what
happened. Each run uses its own topics and groups, so running it again starts clean.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.resources
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.config import Config, Topics
from pipeline.dps.emulator import load_devices, start_emulator
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages import runtime
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink
from pipeline.tools.console import make_console
from pipeline.tools.replay import load_fixture, replay
from pipeline.tools.services import local_available, own_brokers

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

__all__ = ["demo_config", "run", "wait_idle"]

_DATA = importlib.resources.files("pipeline.tools") / "data"
DEMO_FIXTURE = _DATA / "demo.jsonl"
"""The bundled demo fixture (package data, so it ships in the wheel and the image)."""
DEMO_LATER = _DATA / "demo-later.jsonl"
"""Sent once the bundled fixture is done: the platform deletes a child."""
DEMO_DEVICES = _DATA / "demo-devices.json"
"""The devices the demo's DPS emulator knows (two sns are missing or group-less on purpose)."""


def demo_config(cfg: Config, run_id: str, dps_url: str) -> Config:
    """``cfg`` with topics, groups, ids and the MQTT topic unique to this run."""
    topics = Topics(
        **{f: f"demo.{run_id}.{getattr(Topics(), f)}" for f in Topics.__struct_fields__}
    )
    replace = msgspec.structs.replace
    return replace(
        cfg,
        mqtt=replace(
            cfg.mqtt,
            topic=f"demo/{run_id}/$oc/devices/+/sys/events/down",
            client_id=f"demo-{run_id}-ingest",
            shared_group=None,
        ),
        kafka=replace(cfg.kafka, topics=topics),
        router=replace(
            cfg.router, group_id=f"demo-{run_id}-router", transactional_id=f"demo-{run_id}-router"
        ),
        sink=replace(
            cfg.sink,
            group_id=f"demo-{run_id}-sink",
            dps=replace(cfg.sink.dps, base_url=dps_url),
            device_data={"deviceName": "name", "model": "model"},
            on_delete="reset",
        ),
    )


async def wait_idle(cfg: Config, published: int, limit: float = 120) -> None:
    """Until ingest has landed every published message and both consumers have no lag."""
    t = cfg.kafka.topics
    async with asyncio.timeout(limit):
        stable = 0
        while stable < 3:  # noqa: PLR2004  (three quiet polls in a row)
            landed = await kafka.size(cfg.kafka, t.down_events, t.down_events_dlq)
            router_lag = await kafka.backlog(cfg.kafka, cfg.router.group_id, t.down_events)
            sink_lag = await kafka.backlog(cfg.kafka, cfg.sink.group_id, t.added)
            sink_lag += await kafka.backlog(cfg.kafka, cfg.sink.group_id, t.deleted)
            stable = stable + 1 if landed >= published and not router_lag and not sink_lag else 0
            await asyncio.sleep(0.3)


async def _read(cfg: Config, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    async with kafka.reader(cfg.kafka) as reader:
        ranges = await kafka.whole(reader, topic)
        return [record async for record in kafka.read_range(reader, ranges)]


async def run(
    cfg: Config, fixture: str | None = None, brokers: Literal["own", "configured"] | None = None
) -> int:
    """Run the demo; exit code 0 when every stage went idle.

    Args:
        cfg: the configuration (its brokers are used with ``brokers="configured"``).
        fixture: a replay fixture instead of the bundled one.
        brokers: ``own`` (the default in a checkout with deploy/local installed) or
            ``configured`` (the default elsewhere).
    """
    console = make_console(stderr=True)
    if (brokers or ("own" if local_available() else "configured")) == "configured":
        return await _on_configured(console, cfg, fixture)
    async with contextlib.AsyncExitStack() as stack:
        with console.status("starting a Mosquitto and a Kafka for the demo"):
            own = await stack.enter_async_context(own_brokers())
        return await _with_fixture(console, own.configure(cfg), fixture)


async def _on_configured(console: Console, cfg: Config, fixture: str | None) -> int:
    run_id = uuid.uuid4().hex[:8]
    try:
        return await _with_fixture(console, cfg, fixture, run_id)
    finally:
        await _remove(cfg, run_id)


async def _with_fixture(
    console: Console, cfg: Config, fixture: str | None, run_id: str | None = None
) -> int:
    with (
        importlib.resources.as_file(DEMO_FIXTURE) as bundled,
        importlib.resources.as_file(DEMO_LATER) as later,
    ):
        paths = [Path(fixture)] if fixture else [bundled, later]
        return await _run(console, cfg, paths, run_id or uuid.uuid4().hex[:8])


async def _remove(cfg: Config, run_id: str) -> None:
    """Delete the topics and groups a run on the configured brokers created there.

    Its MQTT session ended with its ingest, which retires.
    """
    names = demo_config(cfg, run_id, "http://127.0.0.1").kafka
    with contextlib.suppress(Exception):  # Kafka gone: nothing more to do about it
        await kafka.delete_topics(cfg.kafka, names.topics.all())
        await kafka.delete_groups(cfg.kafka, [f"demo-{run_id}-router", f"demo-{run_id}-sink"])


async def _run(console: Console, cfg: Config, paths: list[Path], run_id: str) -> int:
    messages = [message for path in paths for message in load_fixture(path)]
    started = time.monotonic()
    with importlib.resources.as_file(DEMO_DEVICES) as devices_file:
        devices = load_devices(devices_file)
    async with await start_emulator(devices=devices) as emulator:
        cfg = demo_config(cfg, run_id, emulator.url)
        console.print(f"run {run_id}: DPS emulator at {emulator.url}, topics demo.{run_id}.*")
        timed_out = False
        try:
            await _run_stages(cfg, paths, run_id, console)
        except* TimeoutError:
            timed_out = True
        if timed_out:
            console.print(
                "[red]the stages did not go idle in time[/red]: rerun with --log-level info "
                "to see what they were doing"
            )
            return 1
        calls = collections.Counter(call.action for call in emulator.state.calls)
        await _summary(console, cfg, len(messages), calls, time.monotonic() - started)
    return 0


async def _run_stages(cfg: Config, paths: list[Path], run_id: str, console: Console) -> None:
    stop = asyncio.Event()
    health = Health()
    stages: list[runtime.Stage] = [Ingest(cfg, retire=True), Router(cfg), Sink(cfg)]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runtime.run_all(stages, stop, health), name="demo.stages")
        try:
            async with asyncio.timeout(60):
                while not health.report().get("ingest.mqtt"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            published = 0
            for path in paths:  # each once the one before is done
                published += await replay(cfg.mqtt, [path], topic_prefix=f"demo/{run_id}/")
                with console.status("waiting until every stage is idle"):
                    await wait_idle(cfg, published)
        finally:
            stop.set()


async def _summary(
    console: Console, cfg: Config, published: int, calls: collections.Counter[str], took: float
) -> None:
    t = cfg.kafka.topics
    landed, dlq, added, failed, deleted, allocated, released, rejected = await asyncio.gather(
        *(
            _read(cfg, topic)
            for topic in (
                t.down_events,
                t.down_events_dlq,
                t.added,
                t.failed,
                t.deleted,
                t.allocations,
                t.releases,
                t.allocations_dlq,
            )
        )
    )
    notified = sum(
        1 for r in added if json.loads(r.value).get("source_event") == "add_sub_device_notify"
    )
    table = Table(title=f"demo summary ({took:.1f} s)", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    for label, value in (
        ("MQTT messages published", published),
        ("down events landed in Kafka", len(landed)),
        ("messages dead-lettered by ingest", len(dlq)),
        ("children added (unique)", len(added)),
        ("of them added elsewhere (notify)", notified),
        ("children IoTDA failed to add", len(failed)),
        ("children deleted", len(deleted)),
        ("DPS allocate calls", calls["allocate"]),
        ("allocations succeeded", len(allocated)),
        ("allocations dead-lettered", len(rejected)),
        ("DPS reset calls (sink.on_delete = reset)", calls["resetAllocationStatus"]),
        ("children released", len(released)),
    ):
        table.add_row(label, str(value))
    console.print(table)
    reasons: collections.Counter[str] = collections.Counter()
    for record in dlq:
        reasons[f"ingest DLQ: {dict(record.headers)['error'].decode()}"] += 1
    for record in failed:
        reason: dict[str, Any] = json.loads(record.value)["reason"]
        reasons[
            f"IoTDA failed {reason['node_id']}: {reason['error_code']} {reason['error_msg']}"
        ] += 1
    for record in rejected:
        outcome = json.loads(record.value)
        reasons[
            f"DPS {outcome['error_kind']} sn {outcome['sn']}: {outcome['code']} {outcome['msg']}"
        ] += 1
    for text, n in sorted(reasons.items()):
        # DPS's and IoTDA's words: a "[...]" in them is not markup.
        console.print(f"  {escape(text)}" + (f"  (x{n})" if n > 1 else ""))
    with contextlib.suppress(Exception):
        sample = json.loads(allocated[0].value) if allocated else None
        if sample:
            status = sample["device"]["status"]["currentStatus"]
            console.print(f"  e.g. sn {sample['sn']} -> {status} in org {sample['org_id']}")
