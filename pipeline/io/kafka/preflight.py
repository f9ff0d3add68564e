"""Is Kafka there, and does it take our TLS and SASL settings? Asked before any client starts.

Every "is Kafka there?" goes through :func:`probe` / :func:`wait_until_reachable`: a
refusal only the operator can fix (a wrong password, mechanism or CA) is said at once,
in one line naming what to check; anything else is waited for.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaError, SaslAuthenticationFailed, UnsupportedSaslMechanismError
from aiokafka.protocol.metadata import MetadataRequest

from pipeline.errors import ConfigError, ServiceUnreachable
from pipeline.io.aio import wait_for_service, why_unreachable
from pipeline.io.kafka.clients import settings

if TYPE_CHECKING:
    from pipeline.config import KafkaConfig

__all__ = ["probe", "wait_until_reachable"]

log = logging.getLogger(__package__)  # the package's one logger: pipeline.io.kafka


async def probe(cfg: KafkaConfig, limit: float | None = None) -> None:
    """One attempt to reach Kafka the way the clients will, without their retry loops.

    Each bootstrap server in turn: connect (TLS and SASL as configured), ApiVersions, and
    a metadata request that must list at least one broker (a broker still starting lists
    none). aiokafka's own bootstrap failure says only "Unable to bootstrap" and logs the
    cause; here the cause is in the error.

    Args:
        cfg: the Kafka section.
        limit: seconds for each server, at most (``kafka.request_timeout`` otherwise).

    Raises:
        ServiceUnreachable: no server answered; the reason says why, per server.
        ConfigError: a server refused our TLS or SASL settings (a wrong password or
            mechanism, a certificate that does not verify against ``kafka.tls.ca_file``,
            TLS against a plaintext listener): one line saying what to check.
    """
    timeout = min(cfg.request_timeout, limit) if limit else cfg.request_timeout
    try:
        opts = settings(cfg)
    except (OSError, ssl.SSLError) as exc:  # the CA, certificate or key file
        msg = f"kafka.tls: cannot load the TLS files: {exc}"
        raise ConfigError(msg) from exc
    reasons: list[tuple[str, str]] = []
    for host, port, _ in collect_hosts(cfg.bootstrap_servers, randomize=False):
        try:
            async with asyncio.timeout(timeout):
                conn = await create_conn(
                    host,
                    port,
                    client_id=cfg.client_id,
                    request_timeout_ms=int(timeout * 1000),
                    ssl_context=opts.get("ssl_context"),
                    security_protocol=opts["security_protocol"],
                    sasl_mechanism=opts.get("sasl_mechanism"),
                    sasl_plain_username=opts.get("sasl_plain_username"),
                    sasl_plain_password=opts.get("sasl_plain_password"),
                )
            try:
                async with asyncio.timeout(timeout):
                    metadata = await conn.send(MetadataRequest([]))
            finally:
                conn.close()
                await asyncio.sleep(0)  # let the transport close its socket now
        except (SaslAuthenticationFailed, UnsupportedSaslMechanismError, ssl.SSLError) as exc:
            # Waiting will not fix a wrong password, mechanism or CA: say so and stop.
            msg = f"Kafka at {host}:{port}: {_refusal(exc, cfg)}"
            raise ConfigError(msg) from exc
        except (OSError, TimeoutError, KafkaError) as exc:
            reasons.append((f"{host}:{port}", _reason(exc, timeout)))
            continue
        if metadata.brokers:
            return
        reasons.append((f"{host}:{port}", "the broker is starting (it lists no broker yet)"))
    if len(reasons) == 1:
        reason = reasons[0][1]
    else:
        reason = "; ".join(f"{address}: {why}" for address, why in reasons)
    raise ServiceUnreachable("Kafka", cfg.bootstrap_servers, reason)


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, KafkaError):
        text = str(exc.args[0]) if exc.args else ""
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return why_unreachable(exc, timeout)


def _refusal(exc: Exception, cfg: KafkaConfig) -> str:
    """What the operator should look at, for a refusal :func:`probe` met."""
    if isinstance(exc, SaslAuthenticationFailed):
        return (
            f"SASL {cfg.sasl_mechanism} authentication of user {cfg.sasl_username!r} failed: "
            "check kafka.sasl_username and kafka.sasl_password"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return f"kafka.sasl_mechanism {cfg.sasl_mechanism} is not enabled on the broker ({exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed ({exc.verify_message}): check kafka.tls.ca_file"
        )
    reason = getattr(exc, "reason", None) or exc
    return f"TLS handshake failed ({reason}): is it a TLS listener? check kafka.security_protocol"


async def wait_until_reachable(
    cfg: KafkaConfig, stop: asyncio.Event | None = None, *, within: float | None = None
) -> None:
    """Return once Kafka answers (:func:`probe`), waiting up to ``kafka.startup_timeout``.

    Every stage calls this before it starts its clients, so a worker started together
    with Kafka waits for it instead of dying. While waiting it says so at warning, in the
    pipeline's own words (``waiting for Kafka at 127.0.0.1:9092: connection refused``),
    at most every few seconds.

    Args:
        cfg: the Kafka section.
        stop: set (SIGTERM) to give up waiting at once.
        within: seconds to wait instead of ``cfg.startup_timeout``; 0 tries once.

    Raises:
        ServiceUnreachable: Kafka did not answer in time; one line naming the address.
        Stopped: ``stop`` was set first.
    """
    await wait_for_service(
        lambda limit: probe(cfg, limit),
        service="Kafka",
        address=cfg.bootstrap_servers,
        within=cfg.startup_timeout if within is None else within,
        stop=stop,
        log=log,
    )
