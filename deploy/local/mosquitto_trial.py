"""What a Mosquitto crash loses, and what saving more often costs: a trial per setting.

For each persistence setting, in interleaved rounds (every setting once per round, so
machine noise spreads evenly), on a private Mosquitto started from mosquitto.conf.in:

- loss: an offline persistent session (QoS 1, as ingest's while it is down) has
  ``--messages`` messages queued, each acknowledged to the publisher (PUBACK); then
  SIGKILL, restart, and count what the session still receives;
- publish msg/s: how fast those messages were accepted (each is a change to persist);
- ingest msg/s: ``pipeline ingest`` (in process) landing ``--messages`` into Kafka while
  they are published, MQTT acknowledged only after Kafka, as in production.

Medians per setting are printed as a table. Needs a Kafka for the ingest part
(``--kafka``, default a private one: run ``deploy/local/kafka.sh`` with
``PIPELINE_LOCAL_KAFKA_PORT``). Never point it at a broker others use: it kills Mosquitto.

    .venv/bin/python deploy/local/mosquitto_trial.py --port 32883 --kafka 127.0.0.1:32092
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.config import Config, load_config
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.tools.replay import FixtureMessage, replay_messages

HERE = Path(__file__).resolve().parent
QUIET = 3.0
"""Seconds without a message after which the restarted broker has delivered all it kept."""
SETTINGS = {
    # name: the autosave lines that replace the template's
    "every 30 s": "autosave_interval 30\n",
    "every 1 s": "autosave_interval 1\n",
    "every change": "autosave_on_changes true\nautosave_interval 1\n",
    "every 10 changes": "autosave_on_changes true\nautosave_interval 10\n",
    "every 100 changes": "autosave_on_changes true\nautosave_interval 100\n",
    "every 1000 changes": "autosave_on_changes true\nautosave_interval 1000\n",
}


def _config(state: Path, port: int, autosave: str) -> Path:
    template = (HERE / "mosquitto.conf.in").read_text(encoding="utf-8")
    text = template.replace("@STATE@", str(state)).replace("@PORT@", str(port))
    lines = [
        line
        for line in text.splitlines(keepends=True)
        if not line.startswith(("autosave_interval", "autosave_on_changes"))
    ]
    path = state / "mosquitto" / "mosquitto.conf"
    path.write_text("".join(lines) + autosave, encoding="utf-8")
    return path


@contextlib.contextmanager
def _mosquitto(conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


def _session(port: int, client_id: str) -> aiomqtt.Client:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return aiomqtt.Client(
        "127.0.0.1", port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False, properties=props,
    )  # fmt: skip


def _messages(n: int, run: str) -> list[FixtureMessage]:
    body = (
        b'{"services":[{"service_id":"$time_sync","event_type":"time_sync_response","paras":{}}]}'
    )
    return [
        FixtureMessage(topic=f"trial/{run}/$oc/devices/gw-{i % 10}/sys/events/down", payload=body)
        for i in range(n)
    ]


async def _loss(conf: Path, port: int, n: int, base: Config) -> tuple[int, float]:
    """(messages lost, publish msg/s) for a SIGKILL with ``n`` queued for an offline session."""
    run = uuid.uuid4().hex[:6]
    with _mosquitto(conf, port) as broker:
        async with _session(port, f"trial-{run}") as sub:
            await sub.subscribe(f"trial/{run}/#", qos=1)
        started = time.perf_counter()
        await replay_messages(base.mqtt, _messages(n, run), progress=False)  # all PUBACKed
        rate = n / (time.perf_counter() - started)
        broker.send_signal(signal.SIGKILL)
        broker.wait()
    with _mosquitto(conf, port):
        got = 0
        async with _session(port, f"trial-{run}") as sub:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(QUIET) as quiet:
                    async for _ in sub.messages:
                        got += 1
                        if got == n:
                            break
                        quiet.reschedule(asyncio.get_running_loop().time() + QUIET)
    return n - got, rate


async def _ingest(conf: Path, port: int, n: int, base: Config) -> float:
    """msg/s through ``pipeline ingest`` (MQTT -> Kafka, PUBACK after Kafka's ack)."""
    run = uuid.uuid4().hex[:6]
    topics = msgspec.structs.replace(
        base.kafka.topics, down_events=f"trial.{run}", down_events_dlq=f"trial.{run}.dlq"
    )
    cfg = msgspec.structs.replace(
        base,
        mqtt=msgspec.structs.replace(
            base.mqtt, topic=f"trial/{run}/$oc/devices/+/sys/events/down", client_id=f"ing-{run}"
        ),
        kafka=msgspec.structs.replace(base.kafka, topics=topics),
    )
    with _mosquitto(conf, port):
        health, stop = Health(), asyncio.Event()
        task = asyncio.create_task(Ingest(cfg, health).run(stop))
        while not health.ready:  # noqa: ASYNC110  (a readiness flag, polled as a probe would)
            await asyncio.sleep(0.05)
        async with kafka.reader(cfg.kafka) as reader:
            tps = await kafka.partitions(reader, topics.down_events)
            started = time.perf_counter()
            await replay_messages(cfg.mqtt, _messages(n, run), progress=False)
            while sum((await reader.end_offsets(tps)).values()) < n:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            rate = n / (time.perf_counter() - started)
        stop.set()
        await task
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=32883, help="private Mosquitto port")
    parser.add_argument("--kafka", default="127.0.0.1:32092", help="Kafka for the ingest part")
    # Not a multiple of 10, 100 or 1000: a crash then falls just before a save would have
    # happened, the worst case for "every N changes".
    parser.add_argument("--messages", type=int, default=2499)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", action="append", help="setting names to run (default: all)")
    args = parser.parse_args()
    base = load_config(
        environ={
            "PIPELINE_MQTT__PORT": str(args.port),
            "PIPELINE_KAFKA__BOOTSTRAP_SERVERS": args.kafka,
        }
    )
    settings = {k: v for k, v in SETTINGS.items() if not args.only or k in args.only}
    results: dict[str, dict[str, list[float]]] = {k: {} for k in settings}
    for round_ in range(args.rounds):
        names = list(settings)
        names = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate order
        for name in names:
            with tempfile.TemporaryDirectory(prefix="mosquitto-trial-") as tmp:
                state = Path(tmp)
                (state / "mosquitto" / "data").mkdir(parents=True)
                conf = _config(state, args.port, settings[name])
                lost, publish = await _loss(conf, args.port, args.messages, base)
                shutil.rmtree(state / "mosquitto" / "data")
                (state / "mosquitto" / "data").mkdir()
                ingest = await _ingest(conf, args.port, args.messages, base)
            row = results[name]
            for key, value in (("lost", lost), ("publish", publish), ("ingest", ingest)):
                row.setdefault(key, []).append(value)
            print(f"round {round_ + 1} {name}: lost {lost}, publish {publish:.0f}/s, "
                  f"ingest {ingest:.0f}/s", flush=True)  # fmt: skip
    print(f"\nmedians of {args.rounds} rounds, {args.messages} messages each")
    print("| setting | lost of {n} on SIGKILL (each round) | publish msg/s | ingest msg/s |"
          .replace("{n}", f"{args.messages:,}"))  # fmt: skip
    print("|---|---|---|---|")
    for name, row in results.items():
        lost = ", ".join(str(int(v)) for v in row["lost"])
        publish, ingest = (statistics.median(row[k]) for k in ("publish", "ingest"))
        print(f"| {name} | {statistics.median(row['lost']):.0f} ({lost}) | "
              f"{publish:,.0f} | {ingest:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
