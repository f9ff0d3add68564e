"""Configuration: one TOML file plus ``PIPELINE_<SECTION>__<KEY>`` environment overrides.

Everything decodes into frozen msgspec Structs that forbid unknown keys, so a typo or a
wrong type fails at start-up with one line naming the key (:class:`ConfigError`).
Secret values are :class:`Secret`: their ``repr``/``str`` never show the value; a value
of the form ``file:/path`` is read from that file (Docker/Kubernetes secrets), and
``env:NAME`` from that environment variable.
"""

from __future__ import annotations

import os
import re
import tomllib
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from pipeline.core.problems import explain
from pipeline.errors import ConfigError

__all__ = [
    "Config",
    "DpsConfig",
    "Gateway",
    "IotdaAuthConfig",
    "KafkaConfig",
    "MetricsConfig",
    "MqttConfig",
    "RouterConfig",
    "Secret",
    "SinkConfig",
    "TlsConfig",
    "Topics",
    "load_config",
    "load_gateways",
    "shard_of",
]

ENV_PREFIX = "PIPELINE_"
DEFAULT_PATH = Path("pipeline.toml")

_YEAR = 365 * 24 * 3600.0

# Value types with their range, checked when the configuration is loaded (one line naming
# the key otherwise). NaN fails every bound; durations are finite.
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
"""A TCP port to connect to."""
ListenPort = Annotated[int, msgspec.Meta(ge=0, le=65535)]
"""A TCP port to listen on; 0 picks a free one."""
Seconds = Annotated[float, msgspec.Meta(gt=0, le=_YEAR)]
"""A positive, finite duration in seconds."""
Count = Annotated[int, msgspec.Meta(ge=1)]
"""A positive count."""


class Secret:
    """A secret string that never shows itself in logs, reprs or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value; call only where it is sent to its destination."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every configuration section."""


class TlsConfig(_Section, frozen=True):
    """TLS for a client connection; verification is always on."""

    enabled: bool = False
    ca_file: str | None = None
    """PEM bundle of trusted CAs; the system store when unset."""
    cert_file: str | None = None
    """Client certificate (mutual TLS)."""
    key_file: str | None = None
    key_password: Secret | None = None


class IotdaAuthConfig(_Section, frozen=True):
    """IoTDA device mode: ingest connects as the gateway(s), with derived credentials.

    One gateway: ``device_id`` and ``secret`` here. Many gateways: leave them out and list
    the gateways with their secrets in ``mqtt.gateways_file``; ingest then holds one MQTT
    session per gateway.
    """

    device_id: str | None = None
    secret: Secret | None = None
    sign_type: Literal[0, 1] = 0
    """0: HMAC-SHA256 without the platform's timestamp check; 1: with it."""
    timestamp: str | None = None
    """``YYYYMMDDHH`` to use in the client id and HMAC (sign_type 0 only). The broker keys
    the session by client id: a fixed value keeps it across restarts. When unset, the
    time the worker started is used for all its reconnects."""


class MqttConfig(_Section, frozen=True):
    """The MQTT source of the ingest stage."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "iot-pipeline-ingest"
    """Stable, so the broker keeps the session (and queued messages) while ingest is down."""
    username: str | None = None
    password: Secret | None = None
    topic: str = "$oc/devices/+/sys/events/down"
    qos: Literal[0, 1] = 1
    shared_group: str | None = None
    """Subscribe as ``$share/<group>/<topic>`` so several ingest replicas split the load."""
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive: int = 60
    session_expiry: int = 7 * 24 * 3600
    """Seconds the broker keeps the session after a disconnect (MQTT 5)."""
    max_inflight: int = 1000
    """Messages received but not yet acknowledged (waiting for Kafka)."""
    max_payload: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    """Bytes; a bigger MQTT payload is dead-lettered before decoding (IoTDA's own limit
    is 1 MiB)."""
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    gateways: list[str] = msgspec.field(default_factory=list)
    """Only these gateways: one subscription each (``topic`` with ``+`` replaced by the
    device id) instead of the wildcard. Replicas that split a fleet each get their own."""
    gateways_file: str | None = None
    """A TOML file of ``[[gateway]]`` entries (``device_id``, and ``secret`` in IoTDA
    device mode, e.g. ``"file:/run/secrets/gw-1"``); joins ``gateways``."""
    shard: str | None = None
    """``i/n``: of the listed gateways take those whose stable hash modulo n is i, so n
    replicas given the same list split it without overlap."""
    connect_rate: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 20.0
    """New MQTT connections per second at most, so restarting an ingest that holds many
    gateway sessions is not a connection storm."""
    bridge_state: str | None = None
    """Topic filter of the edge broker's bridge notifications (Mosquitto:
    ``$SYS/broker/connection/+/state``): each bridge is then shown up or down."""
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    iotda: IotdaAuthConfig | None = None


class Topics(_Section, frozen=True):
    """Kafka topic names."""

    down_events: str = "iotda.down-events"
    down_events_dlq: str = "iotda.down-events.dlq"
    added: str = "iotda.subdevices.added"
    failed: str = "iotda.subdevices.failed"
    allocations: str = "dps.allocations"
    allocations_dlq: str = "dps.allocations.dlq"

    def all(self) -> list[str]:
        """Every topic name, in flow order."""
        return [getattr(self, name) for name in self.__struct_fields__]


class KafkaConfig(_Section, frozen=True):
    """The Kafka cluster every stage talks to."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "iot-pipeline"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    topics: Topics = msgspec.field(default_factory=Topics)
    partitions: int = 3
    """Partitions for topics that ``pipeline topics create`` makes."""
    replication_factor: int = 1
    min_insync_replicas: Count | None = None
    """``min.insync.replicas`` of the topics ``pipeline topics create`` makes; the broker's
    default when unset. With ``acks=all``, 2 of 3 replicas keeps writes safe and going
    while one broker is down."""
    create_topics: bool = True
    """Workers create their missing topics at start-up. Set it to false in production,
    where ``pipeline topics create`` (a one-shot job) makes them with the right settings:
    a worker then waits for its topics and fails if they do not appear."""
    linger_ms: int = 5
    request_timeout: float = 30.0
    max_record_size: Annotated[int, msgspec.Meta(ge=64 * 1024, le=64 * 1024 * 1024)] = (
        2 * 1024 * 1024
    )
    """Bytes: the producer's ``max_request_size``, and ``max.message.bytes`` of the topics
    the pipeline creates (room for an ``mqtt.max_payload`` event plus its envelope)."""


class RouterConfig(_Section, frozen=True):
    """The router stage."""

    group_id: str = "iot-pipeline-router"
    transactional_id: str = "iot-pipeline-router"
    """The prefix of the transactional ids, the same for every replica: each input
    partition is written by ``{prefix}-{topic}-{partition}``, so whoever takes a partition
    over fences the previous owner's open transaction."""
    dedup_window: float = 3600.0
    """Seconds during which a redelivered (gateway, event_id) yields nothing new."""
    dedup_max_entries: int = 100_000
    batch_max: int = 500
    """Records consumed and committed per transaction, at most."""


class DpsConfig(_Section, frozen=True):
    """How to reach EnOS DPS through the API gateway."""

    base_url: str = "http://127.0.0.1:8085"
    app_key: str = "demo-app-key"
    app_secret: Secret = msgspec.field(default_factory=lambda: Secret("demo-app-secret"))
    ca_file: str | None = None
    timeout: Seconds = 10.0
    """Deadline of one call; a hand-back on rebalance waits up to twice this."""
    token_refresh_margin: float = 300.0
    """Refresh the access token this many seconds before it expires."""


_PENDING_PER_CALL = 8
"""Default records in progress per call slot: with 50 % of calls failing and the default
retry delays, a record spends about 0.4 s waiting to retry on average, so the waiting
records outnumber the calls in flight several times over; 8 keeps every slot busy."""


class SinkConfig(_Section, frozen=True):
    """The sink stage: DPS allocate for each added child."""

    group_id: str = "iot-pipeline-sink"
    dps: DpsConfig = msgspec.field(default_factory=DpsConfig)
    org_id: str = "o00000000000001"
    org_overrides: dict[str, str] = msgspec.field(default_factory=dict)
    """``product_id`` -> orgId for products that belong to another organisation."""
    sn_from: str = "node_id"
    """``node_id``, ``device_id``, or a template such as ``{product_id}-{node_id}``."""
    device_data: dict[str, str] = msgspec.field(default_factory=dict)
    """Master-data identifier -> DeviceInfo field, or ``extension_info.<key>``."""
    concurrency: Count = 32
    """Allocate calls in flight (each until its outcome is recorded), at most; a record
    waiting to retry holds none."""
    max_pending: Count | None = None
    """Records in progress (calling, waiting to retry, or queued), at most; when unset,
    8 times ``concurrency``."""
    rate_limit: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Allocate calls per second, at most; unlimited when unset. Under throttling (HTTP
    429) the sink learns a lower rate by itself, never above this one."""
    retry_initial: Seconds = 0.1
    """First delay before a record's retry, and before the breaker's first probe."""
    retry_max: Seconds = 30.0
    """Longest delay between a record's retries, and between the breaker's probes."""
    give_up_after: Seconds = 3600.0
    """Seconds of transient failures after which a record goes to the DLQ as exhausted."""
    breaker_failures: Count = 20
    """Calls failing in a row, none succeeding in between, for at least two different sns,
    that open the breaker (pausing intake); a wrong credential or an unreachable
    ``base_url`` opens it at once."""
    commit_interval: Seconds = 1.0

    @property
    def pending_limit(self) -> int:
        """``max_pending``, or its default for ``concurrency``."""
        return self.max_pending or self.concurrency * _PENDING_PER_CALL


class MetricsConfig(_Section, frozen=True):
    """The /metrics, /healthz and /readyz server every worker runs."""

    enabled: bool = True
    host: str = "127.0.0.1"
    ingest_port: int = 9101
    route_port: int = 9102
    sink_port: int = 9103
    run_port: int = 9100
    stall_after: Seconds = 120.0
    """``/healthz`` fails when a stage has work waiting and no progress for this long."""


class Config(_Section, frozen=True):
    """The whole configuration."""

    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    sink: SinkConfig = msgspec.field(default_factory=SinkConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)


class Gateway(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One gateway ingest listens for."""

    device_id: Annotated[str, msgspec.Meta(min_length=1)]
    secret: Secret | None = None
    """Its IoTDA device secret (device mode only)."""


class _GatewaysFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gateway: list[Gateway] = msgspec.field(default_factory=list)


def shard_of(device_id: str, count: int) -> int:
    """The shard of a gateway among ``count``: a stable hash, the same in every process."""
    return zlib.crc32(device_id.encode()) % count


def load_gateways(cfg: MqttConfig) -> list[Gateway]:
    """The gateways this ingest listens for: ``gateways`` and ``gateways_file``, sharded.

    An empty list means: no gateway list, subscribe to ``topic`` as it is.

    Raises:
        ConfigError: one line naming the key or the file and entry at fault.
    """
    gateways = [Gateway(device_id=name) for name in cfg.gateways]
    if cfg.gateways_file is not None:
        gateways += _read_gateways(Path(cfg.gateways_file))
    seen: set[str] = set()
    for gateway in gateways:
        if gateway.device_id in seen:
            msg = f"config key mqtt.gateways: gateway {gateway.device_id} is listed twice"
            raise ConfigError(msg)
        seen.add(gateway.device_id)
    if cfg.shard is None:
        return gateways
    index, _, count = cfg.shard.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        msg = f"config key mqtt.shard: expected i/n with 0 <= i < n, got {cfg.shard!r}"
        raise ConfigError(msg)
    if not gateways:
        msg = "config key mqtt.shard: needs mqtt.gateways or mqtt.gateways_file to split"
        raise ConfigError(msg)
    return [g for g in gateways if shard_of(g.device_id, int(count)) == int(index)]


def _read_gateways(path: Path) -> list[Gateway]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        msg = f"config key mqtt.gateways_file: cannot read {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"gateways file {path} is not valid TOML: {exc}"
        raise ConfigError(msg) from None
    try:
        return msgspec.convert(data, _GatewaysFile, dec_hook=_dec_hook).gateway
    except msgspec.ValidationError as exc:
        problem = explain(exc)
        where = re.sub(
            r"^gateway\[(\d+)\]", lambda m: f"[[gateway]] #{int(m[1]) + 1}", problem.path
        )
        msg = f"gateways file {path}: {where or 'the file'}: {problem.reason}"
        raise ConfigError(msg) from None


def _check_mqtt(cfg: MqttConfig) -> None:
    """Rules across MQTT keys (one line naming the key at fault)."""
    gateways = load_gateways(cfg)
    if cfg.iotda is not None:
        device_id, secret = cfg.iotda.device_id, cfg.iotda.secret
        if device_id is not None and secret is None:
            msg = "config key mqtt.iotda.secret: required key is missing"
            raise ConfigError(msg)
        if device_id is None and (secret is not None or not gateways):
            msg = "config key mqtt.iotda.device_id: required key is missing"
            if not gateways:
                msg += " (or list the gateways and their secrets in mqtt.gateways_file)"
            raise ConfigError(msg)
        if device_id is not None and gateways:
            msg = (
                "config key mqtt.iotda.device_id: one gateway here, "
                "or many in mqtt.gateways_file, not both"
            )
            raise ConfigError(msg)
        if missing := [g.device_id for g in gateways if g.secret is None]:
            msg = f"config key mqtt.gateways_file: device mode needs a secret for {missing[0]}"
            raise ConfigError(msg)
    if cfg.gateways and "+" not in cfg.topic:
        msg = f"config key mqtt.topic: {cfg.topic!r} has no + to put each gateway's device id in"
        raise ConfigError(msg)


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Secret and isinstance(obj, str):
        if obj.startswith("file:"):
            path = Path(obj.removeprefix("file:"))
            try:
                return Secret(path.read_text(encoding="utf-8").rstrip("\r\n"))
            except OSError as exc:
                # The path is not secret; the content is.
                msg = f"cannot read secret file {path}: {exc.strerror}"
                raise ValueError(msg) from None
        if obj.startswith("env:"):
            name = obj.removeprefix("env:")
            if (value := os.environ.get(name)) is None:
                msg = f"environment variable {name} (named by an env: secret) is not set"
                raise ValueError(msg)
            return Secret(value)
        return Secret(obj)
    raise NotImplementedError


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Nest ``PIPELINE_KAFKA__TOPICS__ADDED=x`` as ``{"kafka": {"topics": {"added": "x"}}}``."""
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name.removeprefix(ENV_PREFIX).lower().split("__")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                msg = f"{name}: {'.'.join(parts)} conflicts with another override"
                raise ConfigError(msg)
        node[parts[-1]] = _env_value(value)
    return tree


def _env_value(value: str) -> Any:
    # Tables and arrays (org_overrides, device_data) are written inline in TOML syntax.
    if value.startswith(("{", "[")):
        try:
            return tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            return value
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_name(path: str) -> str:
    return ENV_PREFIX + "__".join(p.upper() for p in path.split("."))


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (if any) and the environment into a :class:`Config`.

    Args:
        path: the TOML file; ``pipeline.toml`` in the working directory when it exists.
        environ: the environment to read overrides from; ``os.environ`` by default.

    Raises:
        ConfigError: one line naming the key at fault (never its value when secret).
    """
    environ = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            msg = f"config file {path} does not exist"
            raise ConfigError(msg) from None
        except tomllib.TOMLDecodeError as exc:
            msg = f"config file {path} is not valid TOML: {exc}"
            raise ConfigError(msg) from None
    overrides = _env_overrides(environ)
    merged = _merge(data, overrides)
    try:
        # strict=False lets environment strings stand for numbers and booleans.
        cfg = msgspec.convert(merged, Config, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, overrides)) from None
    _check_mqtt(cfg.mqtt)
    return cfg


def _explain(exc: msgspec.ValidationError, overrides: dict[str, Any]) -> str:
    """Turn msgspec's ``... - at `$.mqtt.port``` into ``config key mqtt.port: ...``."""
    problem = explain(exc)
    reason = {"missing": "required key is missing", "unknown": "unknown key"}.get(
        problem.kind, problem.reason
    )
    key = problem.path
    node: Any = overrides
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    source = f" (from {_env_name(key)})" if node is not None else ""
    return f"config key {key or '<root>'}{source}: {reason}"
