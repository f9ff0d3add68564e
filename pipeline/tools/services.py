"""The brokers the tools run on: the configured ones, or this checkout's own.

:func:`own_brokers` starts a Mosquitto (Debian's package) and a single-node Kafka (the
jars ``deploy/local/install.sh`` caches) with the settings in ``deploy/local``, on free
ports, their state in a temporary directory, and when the block ends stops them and
deletes it. ``pipeline demo`` and the test suite run on these: a run never connects to
a broker it did not start (127.0.0.1:1883 is Debian's mosquitto service once the
package is installed, and 9092 may be another checkout's Kafka), and it leaves nothing
behind. The processes die with the one that started them, even when it is killed.

From an installed wheel or an image there is no ``deploy/local``: the tools use the
configured brokers, and clean up what they create there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import msgspec

from pipeline.config import KafkaConfig
from pipeline.io import kafka

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from pipeline.config import Config

__all__ = [
    "LOCAL",
    "Brokers",
    "LocalKafka",
    "LocalMosquitto",
    "PortTakenError",
    "free_port",
    "local_available",
    "own_brokers",
    "start_bound",
]

LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"
"""``deploy/local`` of the checkout this package runs from, if it does."""

_START_LIMIT = 90.0
"""Seconds a broker may take to answer after it was started (Kafka: about 6 on 2 cores)."""


def local_available() -> bool:
    """Whether this package runs from a checkout whose local brokers are installed."""
    return (LOCAL / "kafka.sh").exists() and shutil.which("mosquitto") is not None


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
"""The lowest port :func:`free_port` hands out (below: well-known and registered services)."""


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections (Linux's default when unreadable)."""
    try:
        low, high = (int(n) for n in _EPHEMERAL.read_text(encoding="ascii").split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the ephemeral range.

    A port the kernel could give an outgoing connection is not safe for a server: any
    process's connection may take it as its local port between the check and the bind,
    or while a server is down for a restart, and the server then cannot bind it
    (``EADDRINUSE``; the broker-restart tests failed so under a parallel run). Outside
    ``ip_local_port_range`` only an explicit bind can take it.
    """
    low, high = _ephemeral_range()
    outside = [*range(_LOWEST, low), *range(high + 1, 65_536)]
    pick = random.SystemRandom()
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", pick.choice(outside) if outside else 0))
            except OSError:
                continue
            return int(s.getsockname()[1])
    msg = f"no free port on 127.0.0.1 outside the ephemeral range {low}-{high}"
    raise RuntimeError(msg)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it ends (Linux), even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _spawn(
    command: list[str], *, log_file: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log_file.open("ab") as out:
        return subprocess.Popen(  # noqa: S603  (our own scripts and Debian's mosquitto)
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )


def _stop(proc: subprocess.Popen[bytes], limit: float = 30.0) -> None:
    """SIGTERM (the broker saves and closes), SIGKILL after ``limit`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_CONNECTED = re.compile(r"New client connected from \S+ as (.+) \(p\d, c0, ")
"""A Mosquitto log line of a client that asked to keep its session (clean start off)."""


@dataclasses.dataclass
class LocalMosquitto:
    """Debian's Mosquitto with ``deploy/local/mosquitto.conf.in`` (or ``conf``), on ``port``.

    Args:
        state: its own directory: configuration, persistence, log.
        port: where it listens on 127.0.0.1.
        extra: configuration lines appended to the project's.
    """

    state: Path
    port: int
    extra: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        """The broker's log (connection messages included)."""
        return self.state / "mosquitto" / "mosquitto.log"

    def start(self) -> None:
        """Start it (in the background); :meth:`ready` says when it answers."""
        home = self.state / "mosquitto"
        (home / "data").mkdir(parents=True, exist_ok=True)
        template = (LOCAL / "mosquitto.conf.in").read_text(encoding="utf-8")
        conf = template.replace("@STATE@", str(self.state)).replace("@PORT@", str(self.port))
        (home / "mosquitto.conf").write_text(conf + self.extra, encoding="utf-8")
        self.proc = _spawn(
            ["mosquitto", "-c", str(home / "mosquitto.conf")], log_file=home / "stderr.log"
        )

    async def ready(self, limit: float = _START_LIMIT) -> None:
        """Until an MQTT client connects (or the broker exits: then raise)."""
        await _until(
            self.proc,
            self.answers,
            name="Mosquitto",
            port=self.port,
            limit=limit,
            log_file=self.log_file,
        )

    async def answers(self) -> bool:
        """Whether an MQTT client can connect now."""
        try:
            async with asyncio.timeout(2), aiomqtt.Client("127.0.0.1", self.port):
                return True
        except (aiomqtt.MqttError, OSError, TimeoutError):
            return False

    def log_size(self) -> int:
        """Where the log ends now (for :meth:`persistent_clients`)."""
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def persistent_clients(self, since: int = 0, until: int | None = None) -> set[str]:
        """Client ids that connected asking to keep their session, between log offsets."""
        with contextlib.suppress(FileNotFoundError), self.log_file.open("rb") as f:
            f.seek(since)
            text = f.read(-1 if until is None else until - since).decode("utf-8", "replace")
            return {m.group(1) for m in _CONNECTED.finditer(text)}
        return set()

    async def end_sessions(self, client_ids: set[str]) -> None:
        """Have the broker drop the sessions of ``client_ids`` (a clean start, expiring at once)."""
        for client_id in sorted(client_ids):
            client = aiomqtt.Client(
                "127.0.0.1",
                self.port,
                identifier=client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=True,
            )
            async with asyncio.timeout(10), client:
                pass

    def stop(self) -> None:
        """SIGTERM (it saves its database), then wait."""
        if self.proc is not None:
            _stop(self.proc)


@dataclasses.dataclass
class LocalKafka:
    """A single-node Kafka (KRaft) run by ``deploy/local/kafka.sh run`` in ``state``.

    Args:
        state: its own directory: data, logs, configuration.
        port: its client listener on 127.0.0.1 (free ports are taken when 0).
        controller_port: its KRaft controller listener.
        env: more ``PIPELINE_LOCAL_KAFKA_*`` settings (the SASL_SSL listener, see kafka.sh).
        brief: a broker for a short run (the demo, one test): the JVM skips its optimising
            compiler, which halves the CPU a start takes and slows sustained load.
    """

    state: Path
    port: int = 0
    controller_port: int = 0
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    brief: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.controller_port = self.controller_port or free_port()

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        """What the broker and kafka.sh printed."""
        return self.state / "kafka.out"

    def start(self) -> None:
        """Start it (in the background); :meth:`ready` says when it answers."""
        self.state.mkdir(parents=True, exist_ok=True)
        env = os.environ | self.env | {
            "PIPELINE_LOCAL_STATE": str(self.state),
            "PIPELINE_LOCAL_KAFKA_PORT": str(self.port),
            "PIPELINE_LOCAL_KAFKA_CONTROLLER_PORT": str(self.controller_port),
        }  # fmt: skip
        if self.brief:
            env["PIPELINE_LOCAL_KAFKA_EXTRA_OPTS"] = "-XX:TieredStopAtLevel=1"
        self.proc = _spawn([str(LOCAL / "kafka.sh"), "run"], log_file=self.log_file, env=env)

    async def ready(self, limit: float = _START_LIMIT) -> None:
        """Until a Kafka client gets the cluster's metadata (or the broker exits: then raise)."""
        await _until(
            self.proc,
            self.answers,
            name="Kafka",
            port=self.port,
            limit=limit,
            log_file=self.log_file,
        )

    async def answers(self) -> bool:
        """Whether a Kafka client gets metadata now."""
        return await kafka_answers(self.bootstrap)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then wait."""
        if self.proc is not None:
            _stop(self.proc)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def kafka_answers(bootstrap: str) -> bool:
    """Whether a Kafka client gets the metadata of the cluster at ``bootstrap`` now."""
    host, _, port = bootstrap.rpartition(":")
    try:  # a closed port first, without a client that would log each refusal at error
        async with asyncio.timeout(2):
            _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    try:
        async with (
            asyncio.timeout(3),
            kafka.admin(KafkaConfig(bootstrap_servers=bootstrap), request_timeout_ms=2000) as c,
        ):
            await c.describe_cluster()
    except Exception:  # any failure to answer means: not yet
        return False
    return True


async def _until(
    proc: subprocess.Popen[bytes] | None,
    answers: Callable[[], Awaitable[bool]],
    *,
    name: str,
    port: int,
    limit: float,
    log_file: Path,
) -> None:
    deadline = time.monotonic() + limit
    while not await answers():
        if proc is None or proc.poll() is not None:
            said = _first_error(log_file)
            if _PORT_TAKEN in said:
                msg = f"{name} could not bind 127.0.0.1:{port}: taken after it was found free"
                raise PortTakenError(msg)
            # The line itself: the log may be gone with its directory when this is read.
            msg = f"{name} on 127.0.0.1:{port} exited at start-up: {said} (log: {log_file})"
            raise RuntimeError(msg)
        if time.monotonic() > deadline:
            msg = f"{name} on 127.0.0.1:{port} did not answer within {limit:g} s (see {log_file})"
            raise RuntimeError(msg)
        await asyncio.sleep(0.1)


_PORT_TAKEN = "Address already in use"


class PortTakenError(RuntimeError):
    """A broker exited because its port was taken between :func:`free_port` and its bind."""


def _first_error(log_file: Path) -> str:
    """The first line of a broker's log that says what went wrong, else its last line."""
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in lines:
        if _PORT_TAKEN in line or "Error" in line or "ERROR" in line or "Exception" in line:
            return line.strip()[:300]
    return next((line.strip()[:300] for line in reversed(lines) if line.strip()), "empty log")


async def start_bound(server: Callable[[int], LocalMosquitto | LocalKafka], tries: int = 3) -> None:
    """Start ``server(attempt)`` and wait until it answers, on fresh ports if one was taken.

    A free port is only free when it is looked at; a server that needs seconds to bind it
    (Kafka: the JVM's start) can find it taken by then, by anything on the machine.
    """
    for attempt in range(1, tries + 1):
        started = server(attempt)
        started.start()
        try:
            await started.ready()
        except PortTakenError:
            await asyncio.to_thread(started.stop)
            if attempt == tries:
                raise
        else:
            return


@dataclasses.dataclass(frozen=True)
class Brokers:
    """Where the brokers of a run answer."""

    mqtt_port: int
    kafka_bootstrap: str

    def configure(self, cfg: Config) -> Config:
        """``cfg`` pointed at these brokers."""
        replace = msgspec.structs.replace
        return replace(
            cfg,
            mqtt=replace(cfg.mqtt, host="127.0.0.1", port=self.mqtt_port),
            kafka=replace(cfg.kafka, bootstrap_servers=self.kafka_bootstrap),
        )


@contextlib.asynccontextmanager
async def own_brokers() -> AsyncIterator[Brokers]:
    """This checkout's Mosquitto and Kafka on free ports, gone (state and all) afterwards."""
    state = Path(tempfile.mkdtemp(prefix="pipeline-brokers-"))
    brokers: list[LocalMosquitto] = []
    clusters: list[LocalKafka] = []

    def mosquitto(attempt: int) -> LocalMosquitto:
        brokers.append(LocalMosquitto(state / f"mosquitto-{attempt}", free_port()))
        return brokers[-1]

    def kafka_run(attempt: int) -> LocalKafka:
        clusters.append(LocalKafka(state / f"kafka-run-{attempt}", brief=True))
        return clusters[-1]

    try:
        await asyncio.gather(start_bound(mosquitto), start_bound(kafka_run))
        yield Brokers(brokers[-1].port, clusters[-1].bootstrap)
    finally:
        for cluster in clusters:  # those that failed have exited already
            await asyncio.to_thread(cluster.stop)
        for broker in brokers:
            broker.stop()
        shutil.rmtree(state, ignore_errors=True)
