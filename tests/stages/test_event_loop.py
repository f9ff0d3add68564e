"""``[runtime] event_loop``: the whole flow, with the workers as users run them.

By default (``auto``) and with ``uvloop``, the router and the sink run on uvloop; ingest,
whose MQTT intake limit needs asyncio's selector loop, keeps asyncio's whatever the
setting says; with ``asyncio``, every process runs on asyncio's. Which loop a process runs on is
read from the libraries it has loaded (``/proc/PID/maps``): uvloop is imported only by a
process that runs on it.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from tests.harness import add_response, read_topic, spawn, terminate, wait_readyz
from tests.stages.sink.support import GROUP, eventually, ok_calls, prepare, with_emulator

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/PID/maps")


def on_uvloop(pid: int) -> bool:
    """Whether process ``pid`` has uvloop's extension loaded."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return any("uvloop/loop." in line for line in maps.splitlines())


@pytest.mark.parametrize(
    ("setting", "on_uv"),
    [
        (None, {"ingest": False, "route": True, "sink": True}),
        ("asyncio", {"ingest": False, "route": False, "sink": False}),
    ],
    ids=["default", "asyncio"],
)
async def test_each_process_on_its_loop_and_every_child_allocated_once(
    cfg: Config, uid: str, setting: str | None, on_uv: dict[str, bool]
) -> None:
    events, per_event = 30, 3
    sns = [f"{uid}-{i}-{c}" for i in range(events) for c in range(per_event)]
    messages = [
        FixtureMessage(
            topic=f"$oc/devices/gw-{i % 4}/sys/events/down",
            payload=orjson.dumps(
                add_response(f"ev-{uid}-{i}", [f"{uid}-{i}-{c}" for c in range(per_event)])
            ),
        )
        for i in range(events)
    ]
    await prepare(cfg)
    port = free_port()
    env = {} if setting is None else {"RUNTIME__EVENT_LOOP": setting}
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        cfg = with_emulator(cfg, emu)
        ingest = await spawn(
            "ingest", cfg, env=env, METRICS__ENABLED="true", METRICS__INGEST_PORT=str(port)
        )
        router = await spawn("route", cfg, env=env)
        sink = await spawn("sink", cfg, env=env)
        await wait_readyz(port, ingest)  # subscribed: the broker keeps what is published now
        await replay_messages(cfg.mqtt, messages, progress=False)
        await eventually(
            lambda: (
                {c.sn for c in ok_calls(emu)} == set(sns)
                or None not in (ingest.returncode, router.returncode, sink.returncode)
            ),
            lambda: f"{len(sns)} allocations (got {len(ok_calls(emu))})",
            timeout=90,
        )
        loops = {name: on_uvloop(p.pid) for name, p in (("ingest", ingest), ("route", router),
                                                         ("sink", sink))}  # fmt: skip
        codes = [await terminate(p) for p in (ingest, router, sink)]
        calls = [c.sn for c in ok_calls(emu)]
    assert loops == on_uv
    assert codes == [0, 0, 0]  # SIGTERM: each hands back or finishes its work and exits 0
    assert collections.Counter(calls) == dict.fromkeys(sns, 1)
    added = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=len(sns))
    assert sorted(r.key for r in added) == sorted(f"prod_{sn}".encode() for sn in sns)
    allocations = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=len(sns))
    assert sorted(r.key for r in allocations) == sorted(sn.encode() for sn in sns)
