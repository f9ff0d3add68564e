"""Deleted children and the order of a child's adds and deletes, across topics.

The records the router would write (AddedChild, DeletedChild, and the ChildState of
each in ``lifecycle``) are written here directly, so each race is set up exactly; the
sink is the real one, against the real Kafka and the DPS emulator over real HTTP.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from typing import Literal

import msgspec
import orjson
import pytest
from aiokafka import ConsumerRecord

from pipeline.config import Config
from pipeline.dps.emulator import RunningEmulator, start_emulator
from pipeline.errors import ConfigError
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.schemas import AddedChild, AllocationFailure, ChildState, DeletedChild, Release
from pipeline.stages import runtime
from pipeline.stages.sink import Sink
from tests.harness import read_topic, running
from tests.stages.sink.support import (
    GATEWAY,
    GROUP,
    eventually,
    prepare,
    source_of,
    with_emulator,
)

pytestmark = pytest.mark.services

Kind = Literal["added", "deleted"]


def device_of(sn: str) -> bytes:
    return orjson.dumps({"node_id": sn, "device_id": f"prod_{sn}", "product_id": "prod"})


def added(sn: str, generation: int) -> bytes:
    return msgspec.json.encode(
        AddedChild(
            gateway_id=GATEWAY,
            event_id=None,
            event_time=None,
            event_time_raw=None,
            source_event="add_sub_device_notify",
            version=generation,
            generation=generation,
            device=msgspec.Raw(device_of(sn)),
        )
    )


def deleted(sn: str, generation: int, *, known: bool = True) -> bytes:
    return msgspec.json.encode(
        DeletedChild(
            gateway_id=GATEWAY,
            device_id=f"prod_{sn}",
            source_event="delete_sub_device_notify",
            event_id=None,
            version=generation,
            event_time=None,
            event_time_raw=None,
            generation=generation,
            device=msgspec.Raw(device_of(sn) if known else b"null"),
        )
    )


def state(sn: str, generation: int, kind: Kind) -> bytes:
    return msgspec.json.encode(
        ChildState(
            device_id=f"prod_{sn}",
            gateway_id=GATEWAY,
            state=kind,
            generation=generation,
            source_event="add_sub_device_notify" if kind == "added" else "delete_sub_device_notify",
            event_id=None,
            version=generation,
            changed_at="2026-12-04T00:00:00.000Z",
            device=msgspec.Raw(device_of(sn)),
        )
    )


async def write(cfg: Config, ops: Iterable[tuple[Kind, str, int]]) -> list[bytes]:
    """What the router writes for each (kind, sn, generation): the child record in
    ``added`` or ``deleted`` and its state in ``lifecycle``; the child records' sources."""
    t = cfg.kafka.topics
    sources = []
    async with kafka.producer(cfg.kafka) as producer:
        for kind, sn, generation in ops:
            key = f"prod_{sn}".encode()
            topic = t.added if kind == "added" else t.deleted
            value = added(sn, generation) if kind == "added" else deleted(sn, generation)
            meta = await producer.send_and_wait(topic, value, key=key)
            await producer.send_and_wait(t.lifecycle, state(sn, generation, kind), key=key)
            sources.append(f"{topic}/{meta.partition}/{meta.offset}".encode())
    return sources


def actions(emu: RunningEmulator) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """The emulator's calls as (action, sn, sns)."""
    return [(c.action, c.sn, tuple(c.sns or ())) for c in emu.state.calls]


def releases(records: list[ConsumerRecord[bytes, bytes]]) -> list[Release]:
    return [msgspec.json.decode(r.value, type=Release) for r in records]


def failures(records: list[ConsumerRecord[bytes, bytes]]) -> list[AllocationFailure]:
    return [msgspec.json.decode(r.value, type=AllocationFailure) for r in records]


def in_flight(emu: RunningEmulator, action: str) -> bool:
    return any(c.action == action and c.http_status is None for c in emu.state.calls)


def allocated(emu: RunningEmulator, sn: str) -> bool:
    device = emu.state.devices.get(sn)
    return device is not None and device.allocated_time is not None


async def test_a_delete_arriving_while_the_allocate_is_in_flight_ends_released(
    cfg: Config, uid: str
) -> None:
    sn = f"{uid}-x"
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP}]) as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        async with running(Sink(cfg), Health()) as task:
            emu.state.set_faults({"latency_ms": 1000})
            await write(cfg, [("added", sn, 1)])
            await eventually(
                lambda: in_flight(emu, "allocate"),
                lambda: f"the allocate on the wire: {actions(emu)}",
                timeout=30,
                task=task,
            )
            (source,) = await write(cfg, [("deleted", sn, 2)])
            emu.state.set_faults({"latency_ms": 0})  # the allocate on the wire keeps its delay
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            released = await read_topic(cfg.kafka, cfg.kafka.topics.releases, expect=1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq)

    # Allocated first (its call was on the wire), then released: DPS ends unallocated.
    assert actions(emu) == [
        ("allocate", sn, ()),
        ("get", sn, ()),
        ("resetAllocationStatus", None, (sn,)),
    ]
    assert not allocated(emu, sn)
    assert [r.key for r in got] == [sn.encode()]
    (release,) = releases(released)
    assert (release.sn, release.device_id, release.action, release.generation) == (
        sn,
        f"prod_{sn}",
        "reset",
        2,
    )
    assert (release.org_id, release.group_id) == (cfg.sink.org_id, GROUP)
    assert source_of(released[0]) == source
    assert dlq == []


async def test_add_delete_add_within_one_second_ends_allocated(cfg: Config, uid: str) -> None:
    sn = f"{uid}-x"
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP}]) as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        async with running(Sink(cfg), Health()) as task:
            # The first allocate stays on the wire 2 s: the delete and the add again are
            # taken in meanwhile, all three within one second.
            emu.state.set_faults({"latency_ms": 2000})
            await write(cfg, [("added", sn, 1)])
            await eventually(
                lambda: in_flight(emu, "allocate"),
                lambda: f"the allocate on the wire: {actions(emu)}",
                timeout=30,
                task=task,
            )
            emu.state.set_faults({"latency_ms": 0})
            await write(cfg, [("deleted", sn, 2), ("added", sn, 3)])
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=2)
            released = await read_topic(cfg.kafka, cfg.kafka.topics.releases, expect=1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq)

    # The delete was superseded by the add that followed it: no get, no reset; the add
    # allocated again (DPS answers the same device). DPS ends allocated.
    assert actions(emu) == [("allocate", sn, ()), ("allocate", sn, ())]
    assert allocated(emu, sn)
    assert [r.key for r in got] == [sn.encode()] * 2
    assert [(r.action, r.generation, r.sn) for r in releases(released)] == [("superseded", 2, sn)]
    assert dlq == []


async def test_a_delete_taken_in_before_its_add_supersedes_it_even_after_a_restart(
    cfg: Config, uid: str
) -> None:
    """The added partition lags: the delete (generation 2) comes first, the add (1) later.

    The add is dead-lettered ``superseded`` without a call, by the running sink (its own
    memory) and, for a second child, by a sink started afresh (the lifecycle table read
    back on assignment).
    """
    first, second = f"{uid}-a", f"{uid}-b"
    await prepare(cfg)
    devices = [{"sn": sn, "group_id": GROUP} for sn in (first, second)]
    async with await start_emulator(devices=devices) as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        async with running(Sink(cfg), Health()):
            await write(cfg, [("deleted", first, 2), ("deleted", second, 2)])
            released = await read_topic(cfg.kafka, cfg.kafka.topics.releases, expect=2)
            (late,) = await _write_added(cfg, first, 1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)
        (later,) = await _write_added(cfg, second, 1)  # while no sink runs
        async with running(Sink(cfg), Health()):
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=2)
        got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations)

    # Never allocated: each delete asked DPS once (not allocated), no add called it.
    assert sorted(actions(emu)) == [("get", first, ()), ("get", second, ())]
    assert sorted((r.sn, r.action) for r in releases(released)) == [
        (first, "not_allocated"),
        (second, "not_allocated"),
    ]
    assert got == []
    assert {
        source_of(r): (f.sn, f.error_kind, f.operation, f.attempts)
        for r, f in zip(dlq, failures(dlq), strict=True)
    } == {
        late: (first, "superseded", "allocate", 0),
        later: (second, "superseded", "allocate", 0),
    }


async def _write_added(cfg: Config, sn: str, generation: int) -> list[bytes]:
    """An added record alone (its lifecycle state is older than the delete's)."""
    async with kafka.producer(cfg.kafka) as producer:
        meta = await producer.send_and_wait(
            cfg.kafka.topics.added, added(sn, generation), key=f"prod_{sn}".encode()
        )
    return [f"{cfg.kafka.topics.added}/{meta.partition}/{meta.offset}".encode()]


async def test_add_delete_add_written_before_the_sink_starts_makes_one_allocate(
    cfg: Config, uid: str
) -> None:
    sn = f"{uid}-x"
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP}]) as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        sources = await write(cfg, [("added", sn, 1), ("deleted", sn, 2), ("added", sn, 3)])
        async with running(Sink(cfg), Health()):
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            released = await read_topic(cfg.kafka, cfg.kafka.topics.releases, expect=1)
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)

    assert actions(emu) == [("allocate", sn, ())]  # only the latest generation called DPS
    assert [source_of(r) for r in got] == [sources[2]]
    assert [
        (source_of(x), y.action) for x, y in zip(released, releases(released), strict=True)
    ] == [(sources[1], "superseded")]
    assert [(source_of(x), y.error_kind) for x, y in zip(dlq, failures(dlq), strict=True)] == [
        (sources[0], "superseded")
    ]


@pytest.mark.parametrize("on_delete", ["record", "reset", "delete"])
async def test_deleted_children_are_released_as_on_delete_says_batched_per_group(
    cfg: Config, uid: str, on_delete: str
) -> None:
    groups = {f"{uid}-{i}": f"{GROUP}-{i % 2}" for i in range(6)}
    unknown = f"{uid}-never-added"
    await prepare(cfg)
    devices = [{"sn": sn, "group_id": group} for sn, group in groups.items()]
    async with await start_emulator(devices=devices) as emu:
        cfg = with_emulator(cfg, emu, on_delete=on_delete, release_linger=0.5)
        async with running(Sink(cfg), Health()):
            await write(cfg, [("added", sn, 1) for sn in groups])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=len(groups))
            emu.state.calls.clear()
            await write(cfg, [("deleted", sn, 2) for sn in groups])
            # A delete of a child the pipeline never saw added: no DeviceInfo, no sn.
            async with kafka.producer(cfg.kafka) as producer:
                await producer.send_and_wait(
                    cfg.kafka.topics.deleted,
                    deleted(unknown, 1, known=False),
                    key=f"prod_{unknown}".encode(),
                )
            recording = on_delete == "record"
            released = await read_topic(
                cfg.kafka, cfg.kafka.topics.releases, expect=7 if recording else 6
            )
            dlq = await read_topic(
                cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=0 if recording else 1
            )
        calls = list(emu.state.calls)

    by_sn = {r.sn: r for r in releases(released)}
    if recording:  # recorded only, even the one without an sn; DPS is not asked
        assert calls == []
        assert dlq == []
        expected: dict[str | None, tuple[str, str]] = {
            sn: ("recorded", f"prod_{sn}") for sn in groups
        }
        expected[None] = ("recorded", f"prod_{unknown}")
        assert {sn: (r.action, r.device_id) for sn, r in by_sn.items()} == expected
        assert all(allocated(emu, sn) for sn in groups)
        return
    action = "resetAllocationStatus" if on_delete == "reset" else "delete"
    assert collections.Counter(c.action for c in calls) == {"get": 6, action: 2}
    batches = {c.group_id: sorted(c.sns or ()) for c in calls if c.action == action}
    assert batches == {
        group: sorted(sn for sn, g in groups.items() if g == group)
        for group in set(groups.values())
    }
    action_taken = "reset" if on_delete == "reset" else "deleted"
    assert {sn: (r.action, r.group_id) for sn, r in by_sn.items()} == {
        sn: (action_taken, group) for sn, group in groups.items()
    }
    if on_delete == "reset":
        assert not any(allocated(emu, sn) for sn in groups)
    else:
        assert not set(groups) & set(emu.state.devices)
    (failure,) = failures(dlq)
    assert (failure.error_kind, failure.operation, failure.sn, failure.device_id) == (
        "invalid",
        on_delete,
        None,
        f"prod_{unknown}",
    )
    assert "sn is unknown" in failure.msg


async def test_a_rejected_reset_is_dead_lettered_with_its_operation(cfg: Config, uid: str) -> None:
    sn = f"{uid}-x"
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP}]) as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        async with running(Sink(cfg), Health()):
            await write(cfg, [("added", sn, 1)])
            await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
            emu.state.set_faults({"no_dps_role": True})
            (source,) = await write(cfg, [("deleted", sn, 2)])
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)
            released = await read_topic(cfg.kafka, cfg.kafka.topics.releases)

    assert released == []
    (failure,) = failures(dlq)
    assert (failure.error_kind, failure.operation, failure.code, failure.sn) == (
        "rejected",
        "reset",
        35603,
        sn,
    )
    assert source_of(dlq[0]) == source
    assert allocated(emu, sn)


async def test_the_sink_refuses_to_start_when_added_deleted_and_lifecycle_differ(
    cfg: Config,
) -> None:
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, [t.deleted], partitions=2)
    await prepare(cfg)
    with pytest.raises(ConfigError) as caught:
        await asyncio.wait_for(runtime.run(Sink(cfg), asyncio.Event()), 60)
    assert str(caught.value) == (
        f"sink needs the same partition count in its co-partitioned topics: {t.added} 3, "
        f"{t.deleted} 2, {t.lifecycle} 3; recreate them alike (pipeline topics create)"
    )


async def test_an_add_waiting_to_retry_gives_way_to_a_later_delete(cfg: Config, uid: str) -> None:
    sn = f"{uid}-x"
    await prepare(cfg)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP}]) as emu:
        emu.state.set_faults({"fail_sns": [sn]})  # every call for it answered 500
        cfg = with_emulator(cfg, emu, on_delete="reset", retry_initial=0.2, retry_max=0.5)
        async with running(Sink(cfg), Health()) as task:
            (source,) = await write(cfg, [("added", sn, 1)])
            await eventually(
                lambda: len(emu.state.calls) >= 2,
                lambda: f"the add retrying: {actions(emu)}",
                timeout=30,
                task=task,
            )
            await write(cfg, [("deleted", sn, 2)])
            dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=1)
            emu.state.set_faults({"fail_sns": []})
            released = await read_topic(cfg.kafka, cfg.kafka.topics.releases, expect=1)
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations)

    (failure,) = failures(dlq)
    assert (failure.error_kind, failure.sn, source_of(dlq[0])) == ("superseded", sn, source)
    assert failure.attempts >= 2
    assert [(r.action, r.generation) for r in releases(released)] == [("not_allocated", 2)]
    assert got == []
    calls = actions(emu)
    assert calls[-1] == ("get", sn, ())  # the delete asked once the sn answered again
    assert set(calls[:-1]) <= {("allocate", sn, ()), ("get", sn, ())}
    assert not allocated(emu, sn)


async def test_a_release_recorded_before_a_crash_is_not_made_again(cfg: Config, uid: str) -> None:
    """A release in ``dps.releases`` past the committed offset (the sink died before its
    commit) is read back like an allocation: its record makes no call."""
    done, todo = f"{uid}-done", f"{uid}-todo"
    await prepare(cfg)
    devices = [{"sn": sn, "group_id": GROUP} for sn in (done, todo)]
    async with await start_emulator(devices=devices) as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        sources = await write(cfg, [("deleted", done, 1), ("deleted", todo, 1)])
        async with kafka.producer(cfg.kafka) as producer:  # what the dead sink recorded
            await producer.send_and_wait(
                cfg.kafka.topics.releases,
                b"{}",
                key=done.encode(),
                headers=[("source", sources[0]), ("sink-group", cfg.sink.group_id.encode())],
            )
        async with running(Sink(cfg), Health()):
            released = await read_topic(cfg.kafka, cfg.kafka.topics.releases, expect=2)

    assert actions(emu) == [("get", todo, ())]  # not for the one already released
    assert [source_of(r) for r in released] == sources
    assert msgspec.json.decode(released[1].value, type=Release).action == "not_allocated"


async def test_a_child_added_again_under_another_gateway_is_allocated(
    cfg: Config, uid: str
) -> None:
    """Generations count within a gateway: re-added under a replacement gateway, the child
    starts at generation 1 there. Between gateways the later record wins (Kafka's
    timestamps), so the old gateway's add and delete are superseded and the replacement's
    add is allocated, whatever order the sink takes the two topics in."""
    sn = f"{uid}-x"
    await prepare(cfg)
    t = cfg.kafka.topics
    key = f"prod_{sn}".encode()

    def moved(value: bytes) -> bytes:  # the same record, from the replacement gateway
        return value.replace(GATEWAY.encode(), b"gw-replacement", 1)

    async with kafka.producer(cfg.kafka) as producer:
        for topic, value in (
            (t.added, added(sn, 1)),
            (t.lifecycle, state(sn, 1, "added")),
            (t.deleted, deleted(sn, 2)),
            (t.lifecycle, state(sn, 2, "deleted")),
        ):
            await producer.send_and_wait(topic, value, key=key)
        await asyncio.sleep(0.01)  # the replacement's records are a later millisecond
        for topic, value in (
            (t.added, moved(added(sn, 1))),
            (t.lifecycle, moved(state(sn, 1, "added"))),
        ):
            await producer.send_and_wait(topic, value, key=key)
    async with await start_emulator(devices=[{"sn": sn, "group_id": GROUP}]) as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        async with running(Sink(cfg), Health()):
            got = await read_topic(cfg.kafka, t.allocations, expect=1)
            released = await read_topic(cfg.kafka, t.releases, expect=1)
            dlq = await read_topic(cfg.kafka, t.allocations_dlq, expect=1)
    assert actions(emu) == [("allocate", sn, ())]
    assert allocated(emu, sn)
    assert [r.key for r in got] == [sn.encode()]
    assert [r.action for r in releases(released)] == ["superseded"]
    assert [(f.error_kind, f.gateway_id) for f in failures(dlq)] == [("superseded", GATEWAY)]
