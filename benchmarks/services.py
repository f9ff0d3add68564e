"""The brokers the bench runs on.

Kafka is the configured one; when it does not answer the bench starts ``deploy/local``'s
(``services.sh up``), which stays up after the run.

Mosquitto (:func:`brokers`): by default (``--mosquitto own``) two of the bench's own,
from this checkout's ``deploy/local`` configuration on free ports, gone afterwards:

- one saving its database every second, on which everything is measured: the stages and
  their ceilings share the broker, and with the persistence policy (a whole-database
  save after every change) the broker, not the clients, sets the pace of every backlog
  (27 msg/s into a few thousand queued messages on this machine), so no stage could be
  told from its ceiling;
- one with the persistence policy exactly as deployed, on which the end-to-end sustained
  rate is measured again beside the first, in interleaved rounds: the policy's cost,
  reported apart (``policy`` in the figures).

``--mosquitto configured`` measures on the configured Mosquitto instead (started from
``deploy/local`` like Kafka when down), with no policy comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
import msgspec

from pipeline.io import kafka, mqtt
from pipeline.tools.services import LocalMosquitto, free_port, local_available

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from pipeline.config import Config, MqttConfig

__all__ = ["EVERY_SECOND", "Mosquittos", "brokers", "ensure_services", "unreachable"]

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


async def ensure_services(cfg: Config, *, mqtt: bool = True) -> None:
    """Return once MQTT (unless not ``mqtt``) and Kafka answer, starting the local ones if need be.

    Raises:
        ConnectionError: they do not answer and there is no ``deploy/local`` to start.
        subprocess.CalledProcessError: ``services.sh up`` failed.
    """
    down = [name for name in await unreachable(cfg) if mqtt or not name.startswith("MQTT")]
    if not down:
        return
    script = LOCAL / "services.sh"
    if not script.exists():
        msg = f"{' and '.join(down)} not reachable: start them, or configure where they are"
        raise ConnectionError(msg)
    log.info("%s not reachable: starting the local services", " and ".join(down))
    await asyncio.to_thread(subprocess.run, [str(script), "up"], check=True)


EVERY_SECOND = "autosave_on_changes false\nautosave_interval 1\n"
"""Appended to ``deploy/local``'s configuration: a save every second instead of after every
change (the last value of an option is the one Mosquitto keeps)."""


@dataclasses.dataclass(frozen=True)
class Mosquittos:
    """Where a bench run measures, and the policy's broker to measure its cost on."""

    cfg: Config
    """The configuration to measure with (its ``mqtt`` the broker saving every second)."""
    policy: MqttConfig | None
    """The broker with the persistence policy as deployed; None with ``configured``."""
    described: str
    """Which Mosquitto the figures come from, for the report."""


@contextlib.asynccontextmanager
async def brokers(cfg: Config, mosquitto: str) -> AsyncIterator[Mosquittos]:
    """The brokers of a run (see the module's docstring); own ones are removed afterwards.

    Raises:
        ConnectionError: Kafka (or the configured Mosquitto) does not answer and there is
            no ``deploy/local`` to start, or ``own`` without Debian's Mosquitto.
    """
    if mosquitto == "configured":
        await ensure_services(cfg)
        yield Mosquittos(cfg, None, f"configured, {cfg.mqtt.host}:{cfg.mqtt.port}")
        return
    if not local_available():
        msg = (
            "--mosquitto own needs this checkout's deploy/local installed "
            "(deploy/local/install.sh); or measure on yours: --mosquitto configured"
        )
        raise ConnectionError(msg)
    await ensure_services(cfg, mqtt=False)
    state = Path(tempfile.mkdtemp(prefix="pipeline-bench-mosquitto-"))
    every = LocalMosquitto(state / "every-second", free_port(), EVERY_SECOND)
    policy = LocalMosquitto(state / "policy", free_port())
    try:
        for broker in (every, policy):
            broker.start()
        await asyncio.gather(every.ready(), policy.ready())
        yield Mosquittos(
            _on(cfg, every.port),
            _on(cfg, policy.port).mqtt,
            "the bench's own, saving every second (the persistence policy's cost apart)",
        )
    finally:
        for broker in (every, policy):
            broker.stop()
        await asyncio.to_thread(shutil.rmtree, state, ignore_errors=True)


def _on(cfg: Config, port: int) -> Config:
    """``cfg`` with its MQTT on the bench's own broker at ``port`` (anonymous, no TLS)."""
    replace = msgspec.structs.replace
    plain = type(cfg.mqtt)()
    own = replace(
        cfg.mqtt, host="127.0.0.1", port=port, username=None, password=None,
        tls=plain.tls, iotda=None,
    )  # fmt: skip
    return replace(cfg, mqtt=own)
