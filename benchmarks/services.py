"""The brokers the bench runs on: the configured ones, started from the checkout if down.

The bench uses the configured Mosquitto and Kafka (``pipeline demo`` starts brokers of its
own instead); when they do not answer it starts ``deploy/local``'s (``services.sh up``),
which stay up after the run.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt

from pipeline.io import kafka, mqtt

if TYPE_CHECKING:
    from pipeline.config import Config

__all__ = ["ensure_services", "unreachable"]

log = logging.getLogger(__name__)

LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "local"
"""``deploy/local`` of the checkout the bench runs from."""
_PROBE_TIMEOUT = 5.0


async def unreachable(cfg: Config) -> list[str]:
    """The services that do not answer a real client call: ``MQTT host:port``, ``Kafka ...``."""
    down = []
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            client = mqtt.connect(
                cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-probe", persistent=False
            )
            async with client:
                pass
    except (aiomqtt.MqttError, TimeoutError, OSError):
        down.append(f"MQTT {cfg.mqtt.host}:{cfg.mqtt.port}")
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT), kafka.reader(cfg.kafka) as reader:
            await kafka.partitions(reader, cfg.kafka.topics.down_events)
    except Exception:  # any failure to answer means: not usable
        down.append(f"Kafka {cfg.kafka.bootstrap_servers}")
    return down


async def ensure_services(cfg: Config) -> None:
    """Return once MQTT and Kafka answer, starting the checkout's local ones if need be.

    Raises:
        ConnectionError: they do not answer and there is no ``deploy/local`` to start.
        subprocess.CalledProcessError: ``services.sh up`` failed.
    """
    down = await unreachable(cfg)
    if not down:
        return
    script = LOCAL / "services.sh"
    if not script.exists():
        msg = f"{' and '.join(down)} not reachable: start them, or configure where they are"
        raise ConnectionError(msg)
    log.info("%s not reachable: starting the local services", " and ".join(down))
    await asyncio.to_thread(subprocess.run, [str(script), "up"], check=True)
