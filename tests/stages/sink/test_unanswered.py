"""An allocate sent and never answered is checked with Get DPS Device before it is repeated.

The emulator's ``cut_rate`` closes the connection after a call took effect; its
``latency_ms`` above ``sink.dps.timeout`` makes the client give up while the call is
still being answered (it takes effect once the latency has passed). Either way the sink
saw no answer for a call that happened: allocating again would be a duplicate.
"""

from __future__ import annotations

import collections

import msgspec
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.ops.server import Health
from pipeline.schemas import PvsDevice
from pipeline.stages.sink import Sink
from tests.harness import read_topic, running
from tests.stages.sink.support import (
    GROUP,
    allocations,
    check_allocation,
    child,
    eventually,
    prepare,
    produce_children,
    with_emulator,
)

pytestmark = pytest.mark.services


async def test_cut_allocates_are_checked_not_repeated(cfg: Config, uid: str) -> None:
    """500 children, 20 % of every DPS call cut after it took effect.

    Exact accounting from the emulator's call log: every sn is allocated by exactly one
    allocate call (none repeated, although ``ambiguous`` of them went unanswered), and
    every cut allocate is followed by Get DPS Device calls for its sn: one, plus one per
    get that was cut itself.
    """
    count = 500
    sns = [f"{uid}-{i:03d}" for i in range(count)]
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP} for sn in sns]) as emu:
        emu.state.set_faults({"cut_rate": 0.2})
        cfg = with_emulator(cfg, emu, retry_initial=0.05, retry_max=0.2)
        await produce_children(cfg, [child(sn) for sn in sns])
        async with running(Sink(cfg), Health()):
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=count)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq)
        calls = list(emu.state.calls)

    allocates = [c for c in calls if c.action == "allocate"]
    gets = [c for c in calls if c.action == "get"]
    assert {c.action for c in calls} == {"allocate", "get"}
    ambiguous = [c for c in allocates if c.cut]
    per_sn = collections.Counter(c.sn for c in allocates)
    duplicates = sum(per_sn.values()) - len(per_sn)
    # 20 % of 500: far more than one cut is certain (p of none ~ 1e-48).
    assert len(ambiguous) > 50
    assert duplicates <= 0.01 * len(ambiguous)
    assert per_sn == dict.fromkeys(sns, 1)  # in fact none
    assert all(c.http_status == 200 and c.code == 0 for c in allocates)
    cut_sns = {c.sn for c in ambiguous}
    gets_per_sn = collections.Counter(c.sn for c in gets)
    cut_gets = collections.Counter(c.sn for c in gets if c.cut)
    assert gets_per_sn == {sn: 1 + cut_gets[sn] for sn in cut_sns}
    print(  # the figure in docs/measured.md  # noqa: T201
        f"\n{count} children, cut_rate 0.2: {len(ambiguous)} ambiguous allocates, "
        f"{duplicates} repeated; {len(gets)} Get DPS Device calls ({sum(cut_gets.values())} cut)"
    )

    assert dlq == []
    assert sorted(r.key for r in got) == sorted(sn.encode() for sn in sns)
    by_sn = {a.sn: a for a in allocations(got)}
    for record in got:
        sn = record.key.decode()
        if sn not in cut_sns:
            check_allocation(cfg, record, sn, attempts=None)
            continue
        # Recorded from Get DPS Device: no requestId, the device as DPS has it.
        assert by_sn[sn].request_id is None
        assert (by_sn[sn].org_id, by_sn[sn].device_id) == (cfg.sink.org_id, f"prod_{sn}")
        device = msgspec.json.decode(by_sn[sn].device, type=PvsDevice)
        assert (device.sn, device.org_id, device.group_id) == (sn, cfg.sink.org_id, GROUP)
        assert device.allocate_status == "allocated"


async def test_a_timed_out_allocate_that_took_effect_is_not_repeated(cfg: Config, uid: str) -> None:
    sn, warm = f"{uid}-slow", f"{uid}-warm"
    await prepare(cfg)
    devices = [{"sn": sn, "group_id": GROUP}, {"sn": warm, "group_id": GROUP}]
    async with await start_emulator(devices=devices) as emu:
        # The read-back on assignment may take 2 x the timeout: not less than 4 s on a
        # loaded machine.
        cfg = with_emulator(cfg, emu, timeout=2.0, retry_initial=0.05, retry_max=0.2)
        async with running(Sink(cfg), Health()) as task:
            # First one allocated at full speed: the access token is fetched and cached
            # (the latency delays the token service too).
            await produce_children(cfg, [child(warm)])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            emu.state.calls.clear()
            emu.state.set_faults({"latency_ms": 3000})  # above the 2 s timeout
            await produce_children(cfg, [child(sn)])
            # The allocate takes effect after the latency, long after the sink gave up.
            await eventually(
                lambda: any(c.action == "allocate" and c.code == 0 for c in emu.state.calls),
                lambda: f"the slow allocate to take effect: {emu.state.calls}",
                timeout=30,
                task=task,
            )
            emu.state.set_faults({"latency_ms": 0})
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=2)
        calls = list(emu.state.calls)

    # One allocate; the retries asked Get DPS Device (timing out too, until the latency
    # was lifted) and the last one found the sn allocated.
    assert [c.action for c in calls if c.action != "get"] == ["allocate"]
    assert calls[-1].action == "get"
    assert (calls[-1].http_status, calls[-1].code) == (200, 0)
    assert [r.key for r in got] == [warm.encode(), sn.encode()]
    value = allocations(got)[1]
    assert value.request_id is None
    device = msgspec.json.decode(value.device, type=PvsDevice)
    assert (device.sn, device.allocate_status) == (sn, "allocated")
