"""Make sure Mosquitto and Kafka answer before a tool uses them (demo, bench).

When both already answer at the configured addresses, nothing is started, so the tools
work from an installed wheel or a container against any broker. Otherwise, in a project
checkout, ``deploy/local/services.sh up`` starts the local ones.
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

__all__ = ["LOCAL_SCRIPT", "ensure_services", "unreachable"]

log = logging.getLogger(__name__)

LOCAL_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "services.sh"
"""``deploy/local/services.sh`` of the checkout this package runs from, if it does."""

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
    if not LOCAL_SCRIPT.exists():
        msg = f"{' and '.join(down)} not reachable: start them, or configure where they are"
        raise ConnectionError(msg)
    log.info("%s not reachable: starting the local services", " and ".join(down))
    await asyncio.to_thread(subprocess.run, [str(LOCAL_SCRIPT), "up"], check=True)
