"""Helpers for tests that run stages against the real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.config import Config, KafkaConfig, to_environ
from pipeline.core.audit import Report
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages import runtime
from pipeline.tools import demo
from pipeline.tools.audit import Only, check, show, summary
from pipeline.tools.services import Brokers, LocalKafka, LocalMosquitto

ROOT = Path(__file__).resolve().parent.parent
"""The project checkout."""
FIXTURES = ROOT / "tests" / "fixtures"
"""The tests' replay fixtures."""
DEMO_FIXTURE = Path(str(demo.DEMO_FIXTURE))
"""The demo's fixture, shipped as package data."""
FIXTURE_FILES = sorted([*FIXTURES.glob("*.jsonl"), DEMO_FIXTURE], key=lambda p: p.name)
"""Every replay fixture of the project."""


@dataclasses.dataclass
class Services:
    """This run's Kafka and this worker's Mosquitto, and the removal of what a test made."""

    brokers: Brokers
    mosquitto: LocalMosquitto
    deferred: set[str] = dataclasses.field(default_factory=set)
    """Groups Kafka kept at a test's end (a killed member's session had not timed out)."""
    _cleaner: _Cleaner | None = None

    @property
    def kafka(self) -> KafkaConfig:
        return KafkaConfig(bootstrap_servers=self.brokers.kafka_bootstrap)

    async def clean(self, marker: str, *, since: int, until: int | None = None) -> None:
        """Remove the MQTT sessions kept between log offsets ``since`` and ``until`` (the
        test's), and the Kafka topics and groups whose names hold ``marker``."""
        await self.mosquitto.end_sessions(self.mosquitto.persistent_clients(since, until))
        topics, groups = await kafka_contents(self.brokers.kafka_bootstrap)
        await kafka.delete_topics(self.kafka, [t for t in topics if marker in t])
        self.deferred |= set(
            await kafka.delete_groups(self.kafka, [g for g in groups if marker in g])
        )

    def clean_later(self, marker: str, *, since: int) -> None:
        """:meth:`clean`, beside the tests that follow: a test's end need not wait for it."""
        if self._cleaner is None:
            self._cleaner = _Cleaner(self)
        # Up to here in the broker's log: later lines are the next test's sessions.
        self._cleaner.submit(marker, since, self.mosquitto.log_size())

    def finish_cleaning(self) -> None:
        """Wait until every :meth:`clean_later` is done; raise if one failed."""
        if self._cleaner is not None:
            self._cleaner.close()
            self._cleaner = None

    async def retry_deferred(self, limit: float = 60) -> None:
        """Delete the deferred groups, waiting for their dead members to time out."""
        async with asyncio.timeout(limit):
            while self.deferred:
                self.deferred = set(await kafka.delete_groups(self.kafka, self.deferred))
                if self.deferred:
                    await asyncio.sleep(0.5)


class _Cleaner:
    """A thread with an event loop of its own that runs :meth:`Services.clean` in turn."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._queue: queue.Queue[tuple[str, int, int] | None] = queue.Queue()
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="cleaner", daemon=True)
        self._thread.start()

    def submit(self, marker: str, since: int, until: int) -> None:
        self._queue.put((marker, since, until))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        assert not self._errors, self._errors

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        while (item := await asyncio.to_thread(self._queue.get)) is not None:
            marker, since, until = item
            try:
                await self._services.clean(marker, since=since, until=until)
            except Exception as exc:  # reported when the worker's session ends
                self._errors.append(f"removing what test {marker} made: {exc!r}")


async def kafka_contents(bootstrap: str) -> tuple[set[str], set[str]]:
    """The topics (Kafka's internal ones aside) and consumer groups of a cluster."""
    async with kafka.admin(KafkaConfig(bootstrap_servers=bootstrap)) as client:
        topics = {t for t in await client.list_topics() if not t.startswith("__")}
        groups = {g[0] for g in await client.list_consumer_groups()}
    return topics, groups


def held_sessions(port: int, client_ids: set[str]) -> set[str]:
    """Which of ``client_ids`` Mosquitto on ``port`` still keeps a session for.

    Asked of the broker itself: each id connects without a clean start, and the CONNACK's
    session-present flag says whether a session was there (it ends with this connection:
    its expiry is 0). Mosquitto's ``$SYS`` client counts cannot say it: they are
    published only when they change, and expire after 60 s.
    """
    held = set()
    for client_id in sorted(client_ids):
        answer: dict[str, bool] = {}
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        client.on_connect = lambda _c, _u, flags, _rc, _p, a=answer: a.update(
            present=flags.session_present
        )
        client.connect("127.0.0.1", port, clean_start=False)
        deadline = time.monotonic() + 10
        while "present" not in answer and time.monotonic() < deadline:
            client.loop(0.05)
        client.disconnect()
        assert "present" in answer, f"no CONNACK for {client_id} from 127.0.0.1:{port}"
        if answer["present"]:
            held.add(client_id)
    return held


@dataclasses.dataclass
class _Reads:
    """What :func:`read_topic` returned while stages of :func:`running` blocks ran."""

    depth: int = 0
    counts: dict[tuple[str, str], tuple[KafkaConfig, int]] = dataclasses.field(default_factory=dict)


_READS = _Reads()


@contextlib.asynccontextmanager
async def running(
    stage: runtime.Stage, health: Health | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """Run a stage on the runtime, in the background; stop it (as SIGTERM would) when the
    block ends. ``health``: where its readiness goes (one of its own otherwise).

    A :func:`read_topic` made while stages run returns what had arrived by then. So when
    the outermost such block ends, with every stage stopped, each topic read inside it
    is read again to its end: a record that followed (a duplicate, say) fails the test.
    """
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stage, stop, health))
    if not _READS.depth:
        _READS.counts = {}
    _READS.depth += 1
    clean = False
    try:
        yield task
        clean = True
    finally:
        _READS.depth -= 1
        stop.set()
        await asyncio.wait_for(task, 60)
    if clean and _READS.depth == 0:
        counts, _READS.counts = _READS.counts, {}
        for (_, topic), (cfg, count) in counts.items():
            after = len(await read_topic(cfg, topic))
            assert after == count, f"{topic}: {after} records once the stages stopped, not {count}"


async def wait_check(health: Health, check: str, task: asyncio.Task[None] | None = None) -> None:
    """Until readiness check ``check`` is true (or ``task``, the stage, died: then raise)."""
    async with asyncio.timeout(30):
        while not health.report().get(check):
            if task is not None and task.done():
                task.result()  # raise what killed it
            await asyncio.sleep(0.02)


async def read_topic(
    cfg: KafkaConfig, topic: str, *, expect: int = 0, timeout: float = 60
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of ``topic`` up to its end now, once at least ``expect`` are.

    Read after the stages that write ``topic`` have stopped, the list is exact: nothing
    can follow, so an extra record fails an exact count. Read inside :func:`running`
    blocks, the count is checked again once their stages have stopped.
    """
    records = await _read(cfg, topic, expect, timeout)
    if _READS.depth:
        _READS.counts[cfg.bootstrap_servers, topic] = (cfg, len(records))
    return records


Records = list[ConsumerRecord[bytes, bytes]]


async def arrived(
    cfg: KafkaConfig,
    topic: str,
    count: int = 0,
    *,
    until: Callable[[Records], bool] | None = None,
    timeout: float = 60,
) -> None:
    """Until ``topic`` holds at least ``count`` committed records, and ``until`` says yes
    to them (as a running stage writes them: repeats allowed, say)."""
    await _read(cfg, topic, count, timeout, until)


async def _read(
    cfg: KafkaConfig,
    topic: str,
    expect: int,
    timeout: float,
    until: Callable[[Records], bool] | None = None,
) -> Records:
    records: list[ConsumerRecord[bytes, bytes]] = []
    async with kafka.reader(cfg) as reader, asyncio.timeout(timeout):
        # The stage under test creates its topics when it starts: wait for them.
        while not (tps := await kafka.partitions(reader, topic)):
            await asyncio.sleep(0.05)
        read_to = await reader.beginning_offsets(tps)
        while True:
            ends = await reader.end_offsets(tps)
            ranges = {tp: (read_to[tp], ends[tp]) for tp in tps if ends[tp] > read_to[tp]}
            records.extend([record async for record in kafka.read_range(reader, ranges)])
            read_to |= {tp: end for tp, (_, end) in ranges.items()}
            if len(records) >= expect and (until is None or until(records)):
                return records
            await asyncio.sleep(0.05)


async def caught_up(cfg: KafkaConfig, group: str, topic: str, *, timeout: float = 60) -> None:
    """Until consumer group ``group`` has committed every record of ``topic``: it has done
    its work on them, including work that writes nothing."""
    async with asyncio.timeout(timeout):
        while await kafka.backlog(cfg, group, topic):
            await asyncio.sleep(0.05)


async def group_stable(cfg: KafkaConfig, group: str, members: int, *, timeout: float = 60) -> None:
    """Until consumer group ``group`` is Stable with ``members`` members (the rebalance done)."""
    async with kafka.admin(cfg) as client:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    [response] = await client.describe_consumer_groups([group])
                except KafkaError as exc:  # the coordinator is still loading, say
                    if not exc.retriable:
                        raise
                else:
                    _, _, state, _, _, joined, *_ = response.groups[0]
                    if state == "Stable" and len(joined) == members:
                        return
                await asyncio.sleep(0.1)


async def audit_holds(
    cfg: Config,
    *,
    only: Only | None = None,
    children: int | None = None,
    events: int | None = None,
) -> Report:
    """The oracle of the chaos and scale tests: ``pipeline audit`` over this test's own
    topics (named by ``cfg``, every record of them: the window is the last day) finds the
    promise kept, with ``children`` added children and ``events`` add responses if given.

    ``only``: ``routing`` where no sink ran, ``outcomes`` where no router ran.
    """
    import datetime as dt  # noqa: PLC0415
    import io  # noqa: PLC0415

    since = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    report = await check(cfg, since=since, only=only, progress=False)
    out = io.StringIO()
    show(report, out)
    assert report.holds, f"pipeline audit would exit 1:\n{out.getvalue()}"
    if children is not None:
        assert report.children == children, summary(report)
    if events is not None:
        assert report.events == events, summary(report)
    return report


def by_key(records: list[ConsumerRecord[bytes, bytes]]) -> list[tuple[Any, Any]]:
    return sorted((r.key, r.value) for r in records)


def worker_env(cfg: Config, **extra: str) -> dict[str, str]:
    """Environment that gives a ``pipeline`` subprocess this test's configuration, plus
    ``extra`` settings (``PIPELINE_*`` names without the prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return env | to_environ(cfg) | {f"PIPELINE_{k}": v for k, v in extra.items()}


SPAWNED: list[asyncio.subprocess.Process] = []
"""Workers started by :func:`spawn`; the ``reap_workers`` fixture kills the survivors."""


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, even by SIGKILL (Linux)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


async def spawn(
    command: str,
    cfg: Config,
    *args: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    **extra: str,
) -> asyncio.subprocess.Process:
    """Start ``python -m pipeline COMMAND ARGS`` with this test's configuration.

    ``env`` and ``extra`` add ``PIPELINE_*`` settings (without the prefix). Its stderr is
    a pipe to read at the end, or the file ``log`` (for a long-running worker whose
    warnings would fill a pipe nobody reads).
    """
    sink = None if log is None else log.open("ab")
    try:
        return await start(
            sys.executable,
            "-m",
            "pipeline",
            "--log-level",
            "warning",
            command,
            *args,
            env=worker_env(cfg, **(env or {}), **extra),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE if sink is None else sink,
        )
    finally:
        if sink is not None:
            sink.close()  # the child has its own copy


async def start(*command: str, **options: Any) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec``, for a process that must not outlive its test.

    It dies with the test's process (even by SIGKILL), and the ``reap_workers`` fixture
    kills it if the test left it running.
    """
    proc = await asyncio.create_subprocess_exec(
        *command, preexec_fn=_die_with_parent if sys.platform == "linux" else None, **options
    )
    SPAWNED.append(proc)
    return proc


def popen(command: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` for a process that dies with the test's process (a broker)."""
    death = _die_with_parent if sys.platform == "linux" else None
    return subprocess.Popen(command, preexec_fn=death, **options)  # noqa: PLW1509


def reap() -> list[int]:
    """SIGKILL every spawned worker still running; returns their pids.

    For after a test, when its event loop may be gone: plain ``os`` calls.
    """
    survivors = []
    for proc in SPAWNED:
        try:
            if os.waitpid(proc.pid, os.WNOHANG) == (0, 0):
                os.kill(proc.pid, signal.SIGKILL)
                os.waitpid(proc.pid, 0)
                survivors.append(proc.pid)
        except ChildProcessError:
            pass  # already reaped by the test's loop
    SPAWNED.clear()
    return survivors


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL: no shutdown code runs."""
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def terminate(proc: asyncio.subprocess.Process, limit: float = 60) -> int:
    """SIGTERM and wait; returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), limit)


def add_response(event_id: str, sns: list[str], failed: Sequence[str] = ()) -> dict[str, object]:
    """An add_sub_device_response event adding ``sns`` (device ids ``prod_<sn>``)."""
    return {
        "services": [
            {
                "service_id": "$sub_device_manager",
                "event_type": "add_sub_device_response",
                "event_id": event_id,
                "event_time": "20261122T063000Z",
                "paras": {
                    "successful_devices": [
                        {"node_id": sn, "device_id": f"prod_{sn}"} for sn in sns
                    ],
                    "failed_devices": [
                        {
                            "node_id": sn,
                            "product_id": "prod",
                            "error_code": "101004",
                            "error_msg": "x",
                        }
                        for sn in failed
                    ],
                },
            }
        ]
    }


async def wait_readyz(port: int, proc: asyncio.subprocess.Process, path: str = "/readyz") -> None:
    """Until the worker subprocess answers ``path`` with 200 (or dies: then fail with its
    stderr). ``/healthz`` answers as soon as the worker's event loop runs (and owns SIGTERM)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            if proc.returncode is not None:
                said = (await proc.stderr.read()).decode() if proc.stderr else "(see its log)"
                msg = f"worker exited with {proc.returncode}: {said}"
                raise AssertionError(msg)
            try:
                async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def private_kafka(tmp: Path, **env: str) -> AsyncIterator[LocalKafka]:
    """A fresh single-node Kafka for tests that stop or reconfigure their broker.

    ``env``: more ``PIPELINE_LOCAL_KAFKA_*`` settings for deploy/local/kafka.sh.
    """
    broker = LocalKafka(tmp, env=env, brief=True)
    broker.start()
    try:
        await broker.ready()
        yield broker
    finally:
        await asyncio.to_thread(broker.stop)


@contextlib.contextmanager
def private_mosquitto(
    tmp: Path,
    port: int,
    extra: str = "",
    probe: tuple[str, str] | None = None,
    probe_args: list[str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A broker of this test's own, so it can be stopped without disturbing the others."""
    (tmp / "data").mkdir(exist_ok=True)
    conf = tmp / "mosquitto.conf"
    if "allow_anonymous" not in extra:
        extra += "allow_anonymous true\n"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\npersistence true\n"
        f"persistence_location {tmp}/data/\nlog_dest file {tmp}/log\n{extra}",
        encoding="utf-8",
    )
    proc = popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    auth = [*(["-u", probe[0], "-P", probe[1]] if probe else []), *(probe_args or [])]
    command = [
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        "$SYS/broker/version",
        "-C",
        "1",
        "-W",
        "1",
    ]
    try:
        for _ in range(50):
            if subprocess.run([*command, *auth], capture_output=True, check=False).returncode == 0:
                break
            if proc.poll() is not None:  # e.g. the port was taken: say so, not "no answer"
                log = (tmp / "log").read_text(encoding="utf-8", errors="replace")
                msg = f"private mosquitto on {port} exited {proc.returncode}: {log[-500:]}"
                raise AssertionError(msg)
            time.sleep(0.1)
        else:
            msg = f"private mosquitto on {port} did not answer"
            raise AssertionError(msg)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def make_certs(tmp: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    ca_key, ca, key, csr, cert = (
        tmp / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
        ]
    )
    run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ]
    )
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")
    run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        ]
    )
    return ca, cert, key
