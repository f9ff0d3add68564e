"""`pipeline demo`, as a newcomer runs it: the whole flow, a clean terminal, nothing left.

In a checkout it runs on brokers of its own and never connects to the configured ones
(Debian's mosquitto service on 1883, another checkout's Kafka); on configured brokers
that come up late it waits for them, and afterwards removes what it created there.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.tools.services import LocalKafka, LocalMosquitto, free_port
from tests import harness
from tests.harness import worker_env

pytestmark = [pytest.mark.services, pytest.mark.slow]

SUMMARY = {
    "MQTT messages published": 11,
    "down events landed in Kafka": 10,
    "messages dead-lettered by ingest": 1,
    "children added (unique)": 21,
    "of them added elsewhere (notify)": 1,
    "children IoTDA failed to add": 5,
    "children deleted": 1,
    "DPS allocate calls": 21,
    "allocations succeeded": 19,
    "allocations dead-lettered": 2,
    "DPS reset calls (sink.on_delete = reset)": 1,
    "children released": 1,
}
"""What the bundled fixture must give, every time."""

REASONS = [
    "DPS rejected sn nogroup-sn-0001: 35404 Group/Device group not found",
    "DPS rejected sn unknown-sn-0001: 35601 Verify not pass/sn not found",
    "IoTDA failed inverter-b-03: 101003 device already exists",
    "IoTDA failed inverter-c-03: 101004 parent device not exist",
    "IoTDA failed meter-c-02: 101004 parent device not exist",
    "IoTDA failed sensor-a-03: 101006 product not exist",
    "IoTDA failed sensor-b-03: 101004 parent device not exist",
    "ingest DLQ: payload is not valid UTF-8 (byte 15: invalid start byte)",
]


async def demo(
    env: dict[str, str], *args: str, started: asyncio.Event | None = None
) -> tuple[int, list[str]]:
    """Run `pipeline demo` as a user would (default log level); exit code, stderr lines.

    ``started`` is set once it has said which run it is (its brokers are used next).
    """
    proc = await harness.start(
        sys.executable,
        "-m",
        "pipeline",
        "demo",
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines = []
    try:
        async with asyncio.timeout(180):
            async for line in proc.stderr:
                lines.append(line.decode().rstrip("\n"))
                if started is not None and lines[-1].startswith("run "):
                    started.set()
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, lines


def check_output(lines: list[str]) -> None:
    """Every line is the demo's own: its run line, the replay bar, the summary, the reasons.

    No log line (the demo logs at error and above only: any would be a false alarm or a
    bug), no traceback.
    """
    assert re.fullmatch(
        r"run [0-9a-f]{8}: DPS emulator at http://127\.0\.0\.1:\d+, topics demo\.[0-9a-f]{8}\.\*",
        lines[0],
    ), lines
    rows = {}
    rest = []
    for line in lines[1:]:
        if m := re.fullmatch(r"│ (.+?) +│ +(\d+) │", line):
            rows[m.group(1)] = int(m.group(2))
        elif re.fullmatch(r"\s*demo summary \(\d+\.\d s\)\s*|[┌├└].*[┐┤┘]", line):
            pass  # the table's title and frame
        elif line.startswith("  replay "):
            pass  # the replay's progress bar
        elif line.startswith("  e.g. sn "):
            assert line.endswith("allocated in org o00000000000001"), line
        else:
            assert line.startswith("  "), line
            rest.append(line.strip())
    assert rows == SUMMARY
    assert rest == REASONS


async def test_demo_runs_on_its_own_brokers_and_leaves_the_configured_ones_alone(
    cfg: Config, tmp_path: Path
) -> None:
    # A plain Mosquitto answers where the configuration points (Debian's service after
    # `apt-get install mosquitto`), and the run's Kafka too: the demo uses neither.
    other = LocalMosquitto(tmp_path / "other", free_port())
    other.start()
    try:
        await other.ready()
        seen = other.log_size()
        env = worker_env(cfg)
        env["PIPELINE_MQTT__PORT"] = str(other.port)
        code, lines = await demo(env)
        assert code == 0, "\n".join(lines)
        check_output(lines)
        assert "New client connected" not in other.log_file.read_bytes()[seen:].decode()
        # (other tests use that Kafka meanwhile: the demo's names are what must be absent)
        topics, groups = await harness.kafka_contents(cfg.kafka.bootstrap_servers)
        assert not [t for t in topics if t.startswith("demo.")]
        assert not [g for g in groups if g.startswith("demo-")]
    finally:
        other.stop()


async def test_demo_on_configured_brokers_that_come_up_late_removes_what_it_made(
    cfg: Config, tmp_path: Path
) -> None:
    mosquitto = LocalMosquitto(tmp_path / "mosquitto", free_port())
    broker = LocalKafka(tmp_path / "kafka", brief=True)
    env = worker_env(cfg)
    env["PIPELINE_MQTT__PORT"] = str(mosquitto.port)
    env["PIPELINE_KAFKA__BOOTSTRAP_SERVERS"] = broker.bootstrap
    started = asyncio.Event()
    running = asyncio.create_task(demo(env, "--brokers", "configured", started=started))
    try:
        await started.wait()  # the demo is up and about to use its brokers: now they come
        mosquitto.start()
        broker.start()
        code, lines = await running
        assert code == 0, "\n".join(lines)
        check_output(lines)
        # Nothing of the demo's is left on the brokers it was given.
        assert await harness.kafka_contents(broker.bootstrap) == (set(), set())
        persistent = mosquitto.persistent_clients()
        assert persistent  # its ingest kept a session while it ran...
        assert harness.held_sessions(mosquitto.port, persistent) == set()  # ...no more
    finally:
        running.cancel()
        await asyncio.to_thread(broker.stop)
        mosquitto.stop()
