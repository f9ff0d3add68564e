"""pipeline reconcile against the real Kafka and the DPS emulator: every kind of difference."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import sys

import msgspec
import orjson
import pytest

from pipeline.config import Config
from pipeline.core.reconcile import Finding
from pipeline.dps.client import DpsClient
from pipeline.dps.emulator import RunningEmulator, start_emulator
from pipeline.io import kafka
from pipeline.schemas import AddedChild, AllocateRequest, ChildState
from pipeline.tools.reconcile import _Progress, check, put_back, reconcile
from tests import harness
from tests.harness import read_topic
from tests.stages.sink.support import with_emulator

pytestmark = pytest.mark.services

ORG = "o00000000000001"  # sink.org_id's default
GROUP = "group-1"
NOW = "2026-12-04T18:00:00.000Z"
LONG_AGO = "2020-01-01T00:00:00.000Z"


def state(
    device_id: str,
    node_id: str | None,
    kind: str = "added",
    generation: int = 1,
    changed_at: str = NOW,
) -> ChildState:
    device = msgspec.Raw(b"null")
    if node_id is not None:
        raw = {"node_id": node_id, "device_id": device_id, "product_id": "prod"}
        device = msgspec.Raw(orjson.dumps(raw))
    return ChildState(
        device_id=device_id,
        gateway_id="gw-1",
        state=kind,  # type: ignore[arg-type]
        generation=generation,
        source_event="add_sub_device_notify" if kind == "added" else "delete_sub_device_notify",
        event_id=None,
        version=generation,
        changed_at=changed_at,
        device=device,
    )


async def write_states(cfg: Config, states: list[ChildState]) -> None:
    await kafka.ensure_topics(cfg.kafka, cfg.kafka.topics.all())
    async with kafka.producer(cfg.kafka) as producer:
        for s in states:
            await producer.send_and_wait(
                cfg.kafka.topics.lifecycle, msgspec.json.encode(s), key=s.device_id.encode()
            )


async def dps_holds(
    cfg: Config, emu: RunningEmulator, registered: list[str], allocated: dict[str, str]
) -> None:
    """Register ``registered`` sns; allocate ``allocated`` (sn -> orgId) through the API."""
    emu.state.register([{"sn": sn, "group_id": GROUP} for sn in registered])
    async with DpsClient(cfg.sink.dps) as dps:
        for sn, org in allocated.items():
            await dps.allocate(org, AllocateRequest(sn=sn))
    emu.state.calls.clear()


# Every kind of finding, and children that agree:
SCENARIO = [
    state("d-ok", "sn-ok"),  # added, allocated in the right org: agrees
    state("d-init", "sn-init"),  # added, registered but not allocated: missing
    state("d-unknown", "sn-unknown"),  # added, DPS has no such sn: missing
    state("d-other", "sn-other"),  # added, allocated in another org: other_org
    state("d-del", "sn-del", "deleted", 2),  # deleted, still allocated: deleted_allocated/kept
    state("d-gone", "sn-gone", "deleted", 2),  # deleted, not allocated: agrees
    state("d-never", None, "deleted"),  # deleted, never seen added: unknown_sn
    state("d-empty", ""),  # added, empty node_id: no sn: unchecked
    # Added, deleted, added again: the latest (generation 3) counts; not allocated: missing.
    state("d-again", "sn-again", "added", 1),
    state("d-again", "sn-again", "deleted", 2),
    state("d-again", "sn-again", "added", 3),
]
REGISTERED = ["sn-ok", "sn-init", "sn-other", "sn-del", "sn-gone", "sn-again"]
ALLOCATED = {"sn-ok": ORG, "sn-other": "o-elsewhere", "sn-del": ORG}


def kinds(findings: list[Finding]) -> list[tuple[str, str, bool]]:
    return sorted((f.device_id, f.kind, f.counted) for f in findings)


EXPECTED_RESET = [
    ("d-again", "missing", True),
    ("d-del", "deleted_allocated", True),
    ("d-empty", "unchecked", True),
    ("d-init", "missing", True),
    ("d-never", "unknown_sn", False),
    ("d-other", "other_org", True),
    ("d-unknown", "missing", True),
]


@pytest.mark.parametrize("method", ["get", "search"])
async def test_every_difference_is_listed_and_the_missing_are_put_back(
    cfg: Config, method: str
) -> None:
    await write_states(cfg, SCENARIO)
    async with await start_emulator() as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        await dps_holds(cfg, emu, REGISTERED, ALLOCATED)
        report, children = await check(cfg, method=method, progress=False, batch=2)  # type: ignore[arg-type]
        calls = list(emu.state.calls)
    assert kinds(report.findings) == EXPECTED_RESET
    assert (report.children, report.added, report.deleted, report.sns) == (9, 6, 3, 7)
    by_id = {f.device_id: f for f in report.findings}
    assert (by_id["d-init"].dps_status, by_id["d-unknown"].dps_status) == ("init", "unknown")
    assert (by_id["d-other"].org_id, by_id["d-other"].dps_org_id) == (ORG, "o-elsewhere")
    assert by_id["d-again"].generation == 3
    assert by_id["d-empty"].detail == "no sn: sn: node_id is empty (sink.sn_from = 'node_id')"
    if method == "get":
        assert {c.action for c in calls} == {"get"}
    else:
        # 7 sns, 2 a call, all in the one orgId the mapping says: 4 searches.
        assert [c.action for c in calls] == ["search"] * 4
        assert report.dps_calls == 4
        assert all(c.expression and c.expression.startswith("sn in (") for c in calls)

    # --redrive: exactly the missing ones, as AddedChild with their latest generation.
    assert await put_back(cfg, children, report.findings) == ["d-again", "d-init", "d-unknown"]
    landed = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=3)
    put = sorted((r.key, msgspec.json.decode(r.value, type=AddedChild)) for r in landed)
    assert [(k, c.source_event, c.generation) for k, c in put] == [
        (b"d-again", "reconcile", 3),
        (b"d-init", "reconcile", 1),
        (b"d-unknown", "reconcile", 1),
    ]
    assert json.loads(bytes(put[1][1].device)) == {
        "node_id": "sn-init",
        "device_id": "d-init",
        "product_id": "prod",
    }


async def test_get_asks_once_per_sn(cfg: Config) -> None:
    await write_states(cfg, SCENARIO)
    async with await start_emulator() as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        await dps_holds(cfg, emu, REGISTERED, ALLOCATED)
        report, _ = await check(cfg, method="get", progress=False)
        calls = list(emu.state.calls)
    expected = ["sn-again", "sn-del", "sn-gone", "sn-init", "sn-ok", "sn-other", "sn-unknown"]
    assert sorted(c.sn or "" for c in calls) == expected
    assert {(c.action, c.org_id) for c in calls} == {("get", ORG)}
    assert report.dps_calls == 7


async def test_on_delete_record_keeps_deleted_allocations_and_all_agree_exits_0(
    cfg: Config,
) -> None:
    agreeing = [
        state("d-ok", "sn-ok"),
        state("d-del", "sn-del", "deleted", 2),  # allocated, but on_delete = "record"
        state("d-gone", "sn-gone", "deleted", 2),
        state("d-never", None, "deleted"),
    ]
    await write_states(cfg, agreeing)
    async with await start_emulator() as emu:
        cfg = with_emulator(cfg, emu, on_delete="record")
        await dps_holds(cfg, emu, ["sn-ok", "sn-del", "sn-gone"], {"sn-ok": ORG, "sn-del": ORG})
        out = io.StringIO()
        code = await reconcile(cfg, as_json=True, progress=False, redrive=True, out=out)
    assert code == 0
    report = json.loads(out.getvalue())
    assert [(f["device_id"], f["kind"], f["counted"]) for f in report["findings"]] == [
        ("d-del", "kept", False),
        ("d-never", "unknown_sn", False),
    ]
    assert report["redriven"] == []
    assert await kafka.size(cfg.kafka, cfg.kafka.topics.added) == 0  # nothing put back


async def test_since_compares_only_children_changed_within_it(cfg: Config) -> None:
    await write_states(
        cfg,
        [
            state("d-old", "sn-old", changed_at=LONG_AGO),  # missing, but outside the window
            state("d-new", "sn-new"),  # missing, inside
            # Added long ago, deleted within the window: compared as deleted (agrees).
            state("d-del", "sn-del", changed_at=LONG_AGO),
            state("d-del", "sn-del", "deleted", 2),
        ],
    )
    async with await start_emulator() as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        since = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        report, _ = await check(cfg, since=since, progress=False)
        calls = list(emu.state.calls)
    assert kinds(report.findings) == [("d-new", "missing", True)]
    assert report.children == 2
    assert sorted(c.sn or "" for c in calls) == ["sn-del", "sn-new"]


async def test_dps_calls_keep_to_the_sink_rate_limit(cfg: Config) -> None:
    count, rate = 25, 10.0
    await write_states(cfg, [state(f"d-{i}", f"sn-{i}") for i in range(count)])
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu, rate_limit=rate, concurrency=8)
        report, _ = await check(cfg, method="get", progress=False)
        stamps = sorted(dt.datetime.fromisoformat(c.at).timestamp() for c in emu.state.calls)
    assert len(report.findings) == count  # all missing (registered on sight, not allocated)
    assert len(stamps) == count
    # Paced by the limiter at 10/s: 25 calls span 2.4 s at least (a clock's millisecond
    # aside; unpaced, at concurrency 8, they take milliseconds). How evenly is the
    # limiter's own property, tested on its schedule (tests/stages/sink/test_parts.py):
    # seen here, at the receiving end of a shared event loop, a stalled loop bunches
    # calls that were sent evenly, so a count per second would test the machine's load.
    assert stamps[-1] - stamps[0] >= (count - 1) / rate - 0.05


async def test_command_line_exit_codes_and_json(cfg: Config) -> None:
    await write_states(cfg, SCENARIO)
    async with await start_emulator() as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        await dps_holds(cfg, emu, REGISTERED, ALLOCATED)
        env = harness.worker_env(cfg)
        proc = await harness.start(
            sys.executable, "-m", "pipeline", "--log-level", "error", "reconcile", "--json",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 3, err.decode()
        report = json.loads(out)
        assert sorted((f["device_id"], f["kind"], f["counted"]) for f in report["findings"]) == [
            tuple(x) for x in EXPECTED_RESET
        ]
        assert report["method"] == "get"  # auto: 7 sns

        proc = await harness.start(
            sys.executable, "-m", "pipeline", "reconcile", "--since", "yesterday",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2
        assert err.decode().startswith("pipeline: --since 'yesterday': give a duration")


async def test_the_table_and_what_was_put_back(cfg: Config) -> None:
    await write_states(cfg, SCENARIO)
    async with await start_emulator() as emu:
        cfg = with_emulator(cfg, emu, on_delete="reset")
        await dps_holds(cfg, emu, REGISTERED, ALLOCATED)
        out = io.StringIO()
        code = await reconcile(cfg, redrive=True, progress=False, out=out)
    assert code == 3
    text = out.getvalue()
    rows = [line for line in text.splitlines() if line.startswith("│ ")]
    assert sorted(row.split("│")[2].strip() for row in rows) == [
        "d-again", "d-del", "d-empty", "d-init", "d-never", "d-other", "d-unknown"
    ]  # fmt: skip
    assert "unknown_sn (not counted)" in text
    added = cfg.kafka.topics.added
    assert f"put back on {added}: d-again, d-init, d-unknown" in text
    assert (
        "9 children (6 added, 3 deleted), 7 sns looked up by get in 7 DPS calls: 6 differences "
        "(findings: 1 deleted_allocated, 3 missing, 1 other_org, 1 unchecked, 1 unknown_sn)"
    ) in text
    landed = await read_topic(cfg.kafka, added, expect=3)
    assert sorted(r.key for r in landed) == [b"d-again", b"d-init", b"d-unknown"]


async def test_throttled_lookups_are_retried_until_answered(cfg: Config) -> None:
    count = 20
    await write_states(cfg, [state(f"d-{i}", f"sn-{i}") for i in range(count)])
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu, concurrency=8)  # no rate_limit: DPS sets the pace
        emu.state.set_faults({"throttle_rps": 5, "retry_after": 0.5})
        report, _ = await check(cfg, method="get", progress=False)
        calls = list(emu.state.calls)
    # Every sn answered in the end: all missing (registered on sight, not allocated).
    assert kinds(report.findings) == sorted((f"d-{i}", "missing", True) for i in range(count))
    throttled = [c for c in calls if c.http_status == 429]
    assert throttled
    assert sorted({c.sn or "" for c in calls if c.http_status == 200}) == sorted(
        f"sn-{i}" for i in range(count)
    )
    assert report.dps_calls == len(calls) == count + len(throttled)


def test_progress_off_a_terminal_is_a_line_a_tenth() -> None:
    stream = io.StringIO()
    progress = _Progress(20, enabled=True, stream=stream)
    with progress.shown() as shown:
        for _ in range(20):
            shown.advance()
    assert stream.getvalue().splitlines() == [
        f"reconcile: {n}/20 sns looked up" for n in range(2, 21, 2)
    ]
    quiet = io.StringIO()
    with _Progress(20, enabled=False, stream=quiet).shown() as shown:
        shown.advance(20)
    assert quiet.getvalue() == ""


async def test_search_looks_up_an_sn_with_a_quote_by_get(cfg: Config) -> None:
    await write_states(cfg, [state("d-q", "sn'q"), state("d-plain", "sn-plain")])
    async with await start_emulator() as emu:
        cfg = with_emulator(cfg, emu)
        await dps_holds(cfg, emu, ["sn'q", "sn-plain"], {"sn'q": ORG})
        report, _ = await check(cfg, method="search", progress=False)
        calls = list(emu.state.calls)
    assert kinds(report.findings) == [("d-plain", "missing", True)]
    assert [(c.action, c.sn, c.expression) for c in calls] == [
        ("search", None, "sn in ('sn-plain')"),
        ("get", "sn'q", None),
    ]
