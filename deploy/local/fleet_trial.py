"""What many gateway sessions in one ``pipeline ingest`` cost: memory, descriptors, start.

For each ``--sessions`` count, a private Mosquitto with IoTDA-style device
authentication (password file and a per-device ACL, as the real IoTDA enforces) and a
gateways file of that many gateways; ``pipeline ingest`` runs in IoTDA device mode (one
MQTT session per gateway, paced by ``mqtt.connect_rate``) until every session is
connected, as ``/readyz`` reports, then its RSS, peak RSS and open descriptors are read
after 3 s of quiet. Prints one JSON line per count. Needs the local Kafka
(``deploy/local/services.sh up``); the topics are this trial's own.

    .venv/bin/python deploy/local/fleet_trial.py --sessions 1,50,500 --connect-rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson

from pipeline.io import mqtt

STAMP = "2026112300"
"""The IoTDA timestamp every gateway signs with (``mqtt.iotda.timestamp``)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _mosquitto(tmp: Path, port: int, devices: list[str]) -> Iterator[None]:
    when = dt.datetime.strptime(STAMP, "%Y%m%d%H").replace(tzinfo=dt.UTC)
    passwords = [f"{d}:{mqtt.iotda_credentials(d, f's-{d}', 0, when)[2]}" for d in devices]
    (tmp / "passwd").write_text("\n".join(["admin:admin-pass", *passwords]) + "\n")
    subprocess.run(["mosquitto_passwd", "-U", str(tmp / "passwd")], check=True)  # noqa: S603, S607
    (tmp / "acl").write_text(
        "user admin\ntopic readwrite $oc/#\ntopic read $SYS/#\n\n"
        "pattern readwrite $oc/devices/%u/#\n"
    )
    (tmp / "data").mkdir()
    (tmp / "mosquitto.conf").write_text(
        f"user root\nlistener {port} 127.0.0.1\npersistence true\n"
        f"persistence_location {tmp}/data/\nlog_dest file {tmp}/log\n"
        f"allow_anonymous false\npassword_file {tmp}/passwd\nacl_file {tmp}/acl\n"
        "max_connections -1\n"
    )
    conf = str(tmp / "mosquitto.conf")
    proc = subprocess.Popen(["mosquitto", "-c", conf], stderr=subprocess.DEVNULL)  # noqa: S603, S607
    probe = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", "admin", "-P"]
    probe += ["admin-pass", "-t", "$SYS/broker/version", "-C", "1", "-W", "1"]
    try:
        for _ in range(50):
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:  # noqa: S603
                break
            time.sleep(0.1)
        else:
            msg = f"the private Mosquitto on {port} did not answer"
            raise SystemExit(msg)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


async def _until_all_connected(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    body = await response.json()
                details = body.get("details", {})
                if body["ready"] and not any(k.startswith("ingest.mqtt") for k in details):
                    return
            await asyncio.sleep(0.2)


def _memory(pid: int) -> tuple[dict[str, int], int]:
    """``/proc``'s Vm* figures of ``pid`` in KiB, and how many descriptors it has open."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    kib = {s.split(":")[0]: int(s.split()[1]) for s in status if s.startswith("Vm")}
    return kib, sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


async def measure(sessions: int, rate: float) -> dict[str, float]:
    """One ingest holding ``sessions`` gateway sessions: start time, memory, descriptors."""
    uid = uuid.uuid4().hex[:6]
    devices = [f"gw{i:05d}-{uid}" for i in range(sessions)]
    with tempfile.TemporaryDirectory(prefix="fleet-trial-") as name:
        tmp = Path(name)
        gateways = tmp / "gateways.toml"
        gateways.write_text(
            "".join(f'[[gateway]]\ndevice_id = "{d}"\nsecret = "s-{d}"\n' for d in devices)
        )
        port, metrics = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")} | {
            "PIPELINE_MQTT__PORT": str(port),
            "PIPELINE_MQTT__GATEWAYS_FILE": str(gateways),
            "PIPELINE_MQTT__IOTDA__TIMESTAMP": STAMP,
            "PIPELINE_MQTT__CONNECT_RATE": str(rate),
            "PIPELINE_MQTT__SESSION_EXPIRY": "60",
            "PIPELINE_METRICS__INGEST_PORT": str(metrics),
            "PIPELINE_KAFKA__TOPICS__DOWN_EVENTS": f"fleet-trial-{uid}",
            "PIPELINE_KAFKA__TOPICS__DOWN_EVENTS_DLQ": f"fleet-trial-{uid}-dlq",
        }
        with _mosquitto(tmp, port, devices):
            started = time.monotonic()
            command = [sys.executable, "-m", "pipeline", "--log-level", "warning", "ingest"]
            proc = subprocess.Popen(command, env=env)  # noqa: S603, ASYNC220  (once, at start)
            try:
                await _until_all_connected(metrics)
                took = time.monotonic() - started
                await asyncio.sleep(3)
                kib, fds = _memory(proc.pid)
            finally:
                proc.terminate()
                proc.wait(60)
    return {
        "sessions": sessions,
        "connect_rate": rate,
        "all_connected_s": round(took, 1),
        "rss_mib": kib["VmRSS"] // 1024,
        "peak_rss_mib": kib["VmHWM"] // 1024,
        "open_fds": fds,
    }


def main() -> None:
    """Run the trial for each count; one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,50,500", help="counts, comma-separated")
    parser.add_argument("--connect-rate", type=float, default=20.0)
    args = parser.parse_args()
    for count in (int(n) for n in args.sessions.split(",")):
        result = asyncio.run(measure(count, args.connect_rate))
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
