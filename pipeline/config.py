"""Configuration: one TOML file plus ``PIPELINE_<SECTION>__<KEY>`` environment overrides.

Everything decodes into frozen msgspec Structs that forbid unknown keys, so a typo, a
wrong type or a value out of range fails at start-up with one line naming the key
(:class:`ConfigError`). Rules that involve several keys (``retry_max >= retry_initial``),
files the configuration names, and the sink's mapping are checked right after, in
:func:`load_config`, with the same one line.
Secret values are :class:`Secret`: their ``repr``/``str`` never show the value; a value
of the form ``file:/path`` is read from that file (Docker/Kubernetes secrets), and
``env:NAME`` from that environment variable.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from pipeline.core.mapping import check_settings
from pipeline.core.problems import explain
from pipeline.core.shards import Shard, share
from pipeline.errors import ConfigError
from pipeline.tls import client_context

__all__ = [
    "Config",
    "DpsConfig",
    "Gateway",
    "IotdaAuthConfig",
    "KafkaConfig",
    "MetricsConfig",
    "MqttConfig",
    "RouterConfig",
    "RuntimeConfig",
    "Secret",
    "SinkConfig",
    "TlsConfig",
    "Topics",
    "TracingConfig",
    "listed_gateways",
    "load_config",
    "to_environ",
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
Wait = Annotated[float, msgspec.Meta(ge=0, le=_YEAR)]
"""A finite time to wait, in seconds; 0 means: try once, do not wait."""
Name = Annotated[str, msgspec.Meta(min_length=1)]
"""A non-empty string: a host, an id, a group."""
TopicName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
"""A Kafka topic name: 1 to 249 of ``A-Z a-z 0-9 . _ -``."""


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
    ca_file: Name | None = None
    """PEM bundle of trusted CAs; the system store when unset."""
    cert_file: Name | None = None
    """Client certificate (mutual TLS)."""
    key_file: Name | None = None
    """Its private key, when not in ``cert_file``."""
    key_password: Secret | None = None


class IotdaAuthConfig(_Section, frozen=True):
    """IoTDA device mode: ingest connects as the gateway(s), with derived credentials.

    One gateway: ``device_id`` and ``secret`` here. Many gateways: leave them out and list
    the gateways with their secrets in ``mqtt.gateways_file``; ingest then holds one MQTT
    session per gateway.
    """

    device_id: Name | None = None
    secret: Secret | None = None
    sign_type: Literal[0, 1] = 0
    """0: HMAC-SHA256 without the platform's timestamp check; 1: with it."""
    timestamp: Annotated[str, msgspec.Meta(pattern=r"^\d{10}$")] | None = None
    """``YYYYMMDDHH`` to use in the client id and HMAC (sign_type 0 only). The broker keys
    the session by client id: a fixed value keeps it across restarts. When unset, the
    time the worker started is used for all its reconnects."""


class MqttConfig(_Section, frozen=True):
    """The MQTT source of the ingest stage."""

    host: Name = "127.0.0.1"
    port: Port = 1883
    client_id: Name = "iot-pipeline-ingest"
    """Stable, so the broker keeps the session (and queued messages) while ingest is down."""
    username: str | None = None
    password: Secret | None = None
    topic: Name = "$oc/devices/+/sys/events/down"
    qos: Literal[0, 1] = 1
    shared_group: Annotated[str, msgspec.Meta(pattern=r"^[^/+#]+$")] | None = None
    """Subscribe as ``$share/<group>/<topic>`` so several ingest replicas split the load."""
    protocol: Literal["3.1.1", "5"] = "5"
    keepalive: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 60
    """Seconds between keep-alive pings (MQTT's field is 16 bits; 0, "never", would leave
    a dead connection undetected)."""
    session_expiry: Annotated[int, msgspec.Meta(ge=1, le=0xFFFFFFFF)] = 7 * 24 * 3600
    """Seconds the broker keeps the session after a disconnect (MQTT 5; 0 would drop the
    messages queued for a stopped ingest)."""
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    """Messages received but not yet acknowledged (waiting for Kafka); MQTT 5's Receive
    Maximum is 16 bits."""
    max_payload: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    """Bytes; a bigger MQTT payload is dead-lettered before decoding (IoTDA's own limit
    is 1 MiB)."""
    reconnect_min: Seconds = 0.5
    reconnect_max: Seconds = 30.0
    startup_timeout: Wait = 60.0
    """Seconds ``ingest`` waits for the broker to answer at start-up before it exits 1."""
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
    sync_requests: Literal["auto", "on", "off"] = "auto"
    """Publish the router's sync requests (``sub_device_sync_request``, on the gateway's up
    topic) for the gateways this ingest holds: ``auto`` in IoTDA device mode only; ``on``
    also through an edge broker (the bridge must carry the up topic to IoTDA)."""
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    iotda: IotdaAuthConfig | None = None


class Topics(_Section, frozen=True):
    """Kafka topic names."""

    down_events: TopicName = "iotda.down-events"
    down_events_dlq: TopicName = "iotda.down-events.dlq"
    added: TopicName = "iotda.subdevices.added"
    failed: TopicName = "iotda.subdevices.failed"
    deleted: TopicName = "iotda.subdevices.deleted"
    lifecycle: TopicName = "iotda.subdevices.lifecycle"
    """Compacted: each child's latest state (added or deleted, and its generation)."""
    router_state: TopicName = "iot-pipeline.router.state"
    """Compacted: the router's own memory (each gateway's version, each child's state),
    partitioned as ``down_events``."""
    sync_requests: TopicName = "iotda.sync-requests"
    allocations: TopicName = "dps.allocations"
    releases: TopicName = "dps.releases"
    allocations_dlq: TopicName = "dps.allocations.dlq"

    def all(self) -> list[str]:
        """Every topic name, in flow order."""
        return [getattr(self, name) for name in self.__struct_fields__]

    def compacted(self) -> set[str]:
        """The topics made with ``cleanup.policy=compact``: a latest value per key."""
        return {self.lifecycle, self.router_state}


class KafkaConfig(_Section, frozen=True):
    """The Kafka cluster every stage talks to."""

    bootstrap_servers: Name = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list."""
    client_id: Name = "iot-pipeline"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    topics: Topics = msgspec.field(default_factory=Topics)
    partitions: Count = 3
    """Partitions for topics that ``pipeline topics create`` makes."""
    replication_factor: Annotated[int, msgspec.Meta(ge=1, le=32767)] = 1
    min_insync_replicas: Count | None = None
    """``min.insync.replicas`` of the topics ``pipeline topics create`` makes; the broker's
    default when unset. With ``acks=all``, 2 of 3 replicas keeps writes safe and going
    while one broker is down."""
    create_topics: bool = True
    """Workers create their missing topics at start-up. Set it to false in production,
    where ``pipeline topics create`` (a one-shot job) makes them with the right settings:
    a worker then waits for its topics and fails if they do not appear."""
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 5
    request_timeout: Seconds = 30.0
    startup_timeout: Wait = 60.0
    """Seconds a worker waits for Kafka to answer at start-up before it exits 1."""
    liveness_interval: Seconds = 5.0
    """Seconds between a worker's checks that Kafka answers: its readiness drops within
    about this long (plus ``request_timeout``'s share, at most 5 s) of losing Kafka."""
    max_record_size: Annotated[int, msgspec.Meta(ge=64 * 1024, le=64 * 1024 * 1024)] = (
        2 * 1024 * 1024
    )
    """Bytes: the producer's ``max_request_size``, and ``max.message.bytes`` of the topics
    the pipeline creates (room for an ``mqtt.max_payload`` event plus its envelope)."""


class RouterConfig(_Section, frozen=True):
    """The router stage."""

    group_id: Name = "iot-pipeline-router"
    transactional_id: Name = "iot-pipeline-router"
    """The prefix of the transactional ids, the same for every replica: each input
    partition is written by ``{prefix}-{topic}-{partition}``, so whoever takes a partition
    over fences the previous owner's open transaction."""
    dedup_window: Seconds = 3600.0
    """Seconds during which a redelivered (gateway, event_id) yields nothing new."""
    dedup_max_entries: Count = 100_000
    batch_max: Count = 500
    """Records consumed and committed per transaction, at most."""


class DpsConfig(_Section, frozen=True):
    """How to reach EnOS DPS through the API gateway."""

    base_url: Name = "http://127.0.0.1:8085"
    """``http://`` or ``https://`` and a host; the API paths are appended."""
    app_key: Name = "demo-app-key"
    app_secret: Secret = msgspec.field(default_factory=lambda: Secret("demo-app-secret"))
    ca_file: Name | None = None
    timeout: Seconds = 10.0
    """Deadline of one call; a hand-back on rebalance waits up to twice this."""
    token_refresh_margin: Annotated[float, msgspec.Meta(ge=0, le=_YEAR)] = 300.0
    """Refresh the access token this many seconds before it expires."""


_PENDING_PER_CALL = 8
"""Default records in progress per call slot: with 50 % of calls failing and the default
retry delays, a record spends about 0.4 s waiting to retry on average, so the waiting
records outnumber the calls in flight several times over; 8 keeps every slot busy."""


class SinkConfig(_Section, frozen=True):
    """The sink stage: DPS allocate for each added child."""

    group_id: Name = "iot-pipeline-sink"
    dps: DpsConfig = msgspec.field(default_factory=DpsConfig)
    org_id: Name = "o00000000000001"
    org_overrides: dict[Name, Name] = msgspec.field(default_factory=dict)
    """``product_id`` -> orgId for products that belong to another organisation."""
    sn_from: str = "node_id"
    """``node_id``, ``device_id``, or a template such as ``{product_id}-{node_id}``."""
    device_data: dict[Name, str] = msgspec.field(default_factory=dict)
    """Master-data identifier -> DeviceInfo field, or ``extension_info.<key>``."""
    on_delete: Literal["record", "reset", "delete"] = "record"
    """What a deleted child costs in DPS: ``record`` only records it in ``dps.releases``;
    ``reset`` resets its allocation (Reset Device Allocation Status); ``delete`` removes
    its registration (Delete DPS Device)."""
    release_batch: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    """At most this many sns in one reset or delete call (one registration group each)."""
    release_linger: Seconds = 0.2
    """Deleted children wait up to this long for others of their group, to share a call."""
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 32
    """Call slots: allocate calls in flight (each until its outcome is recorded), at most,
    besides those DPS is late to answer (``detached_limit``); a record waiting to retry
    holds none."""
    detached_limit: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 512
    """Calls DPS is late to answer (past a soft deadline learnt from its answers) that may
    give their call slot back and stay on the wire without one, at most; 0: a call holds
    its slot until it ends (up to ``dps.timeout``). Calls in flight stay at most
    ``concurrency`` + this."""
    max_pending: Count | None = None
    """Records in progress (calling, waiting to retry, or queued), at most; when unset,
    8 times ``concurrency`` plus ``detached_limit``."""
    rate_limit: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None
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
        """``max_pending``, or its default for ``concurrency`` and ``detached_limit``."""
        return self.max_pending or self.concurrency * _PENDING_PER_CALL + self.detached_limit


class MetricsConfig(_Section, frozen=True):
    """The /metrics, /healthz and /readyz server every worker runs."""

    enabled: bool = True
    host: Name = "127.0.0.1"
    ingest_port: ListenPort = 9101
    route_port: ListenPort = 9102
    sink_port: ListenPort = 9103
    run_port: ListenPort = 9100
    ports: dict[str, ListenPort] = msgspec.field(default_factory=dict)
    """Ports of stages beyond ingest, route and sink, by command name (``{"audit" = 9104}``)."""
    stall_after: Seconds = 120.0
    """``/healthz`` fails when a stage has work waiting and no progress for this long."""
    lag_interval: Seconds = 5.0
    """Seconds between samples of each consumer's lag (``pipeline_consumer_lag``)."""


class TracingConfig(_Section, frozen=True):
    """OpenTelemetry traces (the ``OTEL_*`` environment configures the rest)."""

    enabled: bool = False
    """Spans per message, record and DPS call, exported over OTLP/HTTP. Off, records
    still carry ``traceparent`` and log lines ``trace_id`` (nothing is exported)."""


class RuntimeConfig(_Section, frozen=True):
    """The process itself."""

    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """The asyncio event loop a process runs on. ``auto``: uvloop (libuv's loop, less CPU
    a wake-up: less latency on a busy host, docs/measured.md) for a process that does not
    run ingest, asyncio's for one that does: ingest's intake limit pauses aiomqtt's socket
    reads through the selector that only asyncio's loop has. ``asyncio``: asyncio's for
    every process. ``uvloop``: as ``auto``, and a process that keeps asyncio's says so."""


class Config(_Section, frozen=True):
    """The whole configuration."""

    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    sink: SinkConfig = msgspec.field(default_factory=SinkConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)


class Gateway(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One gateway ingest listens for."""

    device_id: Annotated[str, msgspec.Meta(min_length=1)]
    secret: Secret | None = None
    """Its IoTDA device secret (device mode only)."""


class _GatewaysFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gateway: list[Gateway] = msgspec.field(default_factory=list)


def listed_gateways(cfg: MqttConfig) -> list[Gateway]:
    """The gateways listed in ``gateways`` and ``gateways_file``, each once.

    An empty list means: no gateway list, subscribe to ``topic`` as it is. Which of them
    one ingest replica takes (``shard``) is the ingest stage's business
    (:func:`pipeline.core.shards.share`).

    Raises:
        ConfigError: one line naming the key or the file and entry at fault.
    """
    gateways = [Gateway(device_id=name) for name in cfg.gateways]
    if cfg.gateways_file is not None:
        gateways += _read_gateways(Path(cfg.gateways_file))
    seen: set[str] = set()
    for gateway in gateways:
        if gateway.device_id in seen:
            raise ConfigError.at("mqtt.gateways", f"gateway {gateway.device_id} is listed twice")
        seen.add(gateway.device_id)
    return gateways


def _read_gateways(path: Path) -> list[Gateway]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError.at("mqtt.gateways_file", f"cannot read {path}: {exc.strerror}") from None
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


def _check_gateways(cfg: MqttConfig) -> None:
    """The gateway list, its shard and device mode's credentials (one line naming the key)."""
    gateways = listed_gateways(cfg)
    if cfg.shard is not None:
        _check_shard(cfg.shard, gateways)
    if cfg.iotda is not None:
        device_id, secret = cfg.iotda.device_id, cfg.iotda.secret
        if device_id is not None and secret is None:
            raise ConfigError.at("mqtt.iotda.secret", "required key is missing")
        if device_id is None and (secret is not None or not gateways):
            reason = "required key is missing"
            if not gateways:
                reason += " (or list the gateways and their secrets in mqtt.gateways_file)"
            raise ConfigError.at("mqtt.iotda.device_id", reason)
        if device_id is not None and gateways:
            reason = "one gateway here, or many in mqtt.gateways_file, not both"
            raise ConfigError.at("mqtt.iotda.device_id", reason)
        if missing := [g.device_id for g in gateways if g.secret is None]:
            raise ConfigError.at(
                "mqtt.gateways_file", f"device mode needs a secret for {missing[0]}"
            )
    if cfg.gateways and "+" not in cfg.topic:
        raise ConfigError.at(
            "mqtt.topic", f"{cfg.topic!r} has no + to put each gateway's device id in"
        )


def _check_shard(shard: str, gateways: list[Gateway]) -> None:
    try:
        Shard.parse(shard)
    except ValueError as exc:
        raise ConfigError.at("mqtt.shard", str(exc)) from None
    if not gateways:
        raise ConfigError.at("mqtt.shard", "needs mqtt.gateways or mqtt.gateways_file to split")
    if not share(gateways, shard):
        # Ingest would subscribe to mqtt.topic as it is: every gateway, not none.
        reason = f"{shard} takes none of the {len(gateways)} listed gateways"
        raise ConfigError.at("mqtt.shard", reason)


_TYPE_NAMES = {"dict": "object", "list": "array", "NoneType": "null"}


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Secret:
        if not isinstance(obj, str):
            got = type(obj).__name__
            msg = f"expected `str`, got `{_TYPE_NAMES.get(got, got)}`"
            raise TypeError(msg)  # msgspec adds the key; the value is never shown
        if obj.startswith("file:"):
            path = Path(obj.removeprefix("file:"))
            try:
                return Secret(path.read_text(encoding="utf-8").rstrip("\r\n"))
            except (OSError, UnicodeDecodeError) as exc:
                # The path is not secret; the content is.
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                msg = f"cannot read secret file {path}: {why}"
                raise ValueError(msg) from None
        if obj.startswith("env:"):
            name = obj.removeprefix("env:")
            if (value := os.environ.get(name)) is None:
                msg = f"environment variable {name} (named by an env: secret) is not set"
                raise ValueError(msg)
            return Secret(value)
        return Secret(obj)
    raise NotImplementedError


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Nest ``PIPELINE_KAFKA__TOPICS__ADDED=x`` as ``{"kafka": {"topics": {"added": "x"}}}``.

    Returns:
        The tree, and the variable each dotted key came from (``kafka.topics.added``).
    """
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name.removeprefix(ENV_PREFIX).lower().split("__")
        sources[".".join(parts)] = name
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                msg = f"{name}: {'.'.join(parts)} conflicts with another override"
                raise ConfigError(msg)
        node[parts[-1]] = _env_value(value)
    return tree, sources


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


def _lookup(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def to_environ(cfg: Config) -> dict[str, str]:
    """The ``PIPELINE_*`` variables that make :func:`load_config` give back ``cfg``.

    One variable per key that differs from its default, so a child process started with
    them (and the same configuration file, if any) runs on exactly this configuration:
    the tools and the tests start workers this way. Secrets are revealed: an environment
    is one of the places they may come from.

    Raises:
        ValueError: a key is None where its default is not (no variable can say that).
    """
    out: dict[str, str] = {}

    def walk(value: Any, default: Any, path: list[str]) -> None:
        if isinstance(value, msgspec.Struct):
            # A section that is absent by default is written whole, so that it exists.
            for name in value.__struct_fields__:
                walk(getattr(value, name), getattr(default, name, None), [*path, name])
            return
        if value == default:
            return
        name = ENV_PREFIX + "__".join(part.upper() for part in path)
        if value is None:
            msg = f"{'.'.join(path)}: no environment variable can unset it"
            raise ValueError(msg)
        out[name] = _env_text(value)

    walk(cfg, Config(), [])
    return out


def _env_text(value: Any) -> str:
    """A value as :func:`_env_value` reads it back: tables and arrays in TOML syntax."""
    match value:
        case Secret():
            return value.reveal()
        case bool():
            return "true" if value else "false"
        case dict():
            pairs = ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items())
            return "{ " + pairs + " }"
        case list() | tuple():
            return _toml(value)
        case _:
            return str(value)


def _toml(value: Any) -> str:
    """A TOML inline value (JSON's strings, numbers and arrays are TOML's too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return _env_text(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (if any) and the environment into a checked :class:`Config`.

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
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            msg = f"config file {path} cannot be read: {why}"
            raise ConfigError(msg) from None
        except tomllib.TOMLDecodeError as exc:
            msg = f"config file {path} is not valid TOML: {exc}"
            raise ConfigError(msg) from None
    overrides, sources = _env_overrides(environ)
    merged = _merge(data, overrides)
    try:
        # strict=False lets environment strings stand for numbers and booleans.
        cfg = msgspec.convert(merged, Config, strict=False, dec_hook=_dec_hook)
        _check(cfg)
    except msgspec.ValidationError as exc:
        problem = explain(exc)
        reason = {"missing": "required key is missing", "unknown": "unknown key"}.get(
            problem.kind, problem.reason
        )
        if _is_nan(_lookup(merged, problem.path)):
            reason = "expected a number, got NaN"
        raise _at(problem.path or "<root>", reason, sources) from None
    except ConfigError as exc:
        if exc.key is None:
            raise
        raise _at(exc.key, exc.reason, sources) from None
    return cfg


def _is_nan(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"nan", "+nan", "-nan"}
    return isinstance(value, float) and math.isnan(value)


def _at(key: str, reason: str, sources: dict[str, str]) -> ConfigError:
    """``config key mqtt.port (from PIPELINE_MQTT__PORT): reason``."""
    parts = key.split(".")
    # The key itself, or the table it is in (PIPELINE_SINK__DEVICE_DATA='{ ... }').
    names = [sources.get(".".join(parts[:n])) for n in range(len(parts), 0, -1)]
    name = next((n for n in names if n is not None), None)
    source = f" (from {name})" if name else ""
    return ConfigError(f"config key {key}{source}: {reason}", key=key, reason=reason)


def _check(cfg: Config) -> None:
    """The rules one key's type cannot say: between keys, files named, the sink's mapping.

    Raises:
        ConfigError: naming the key at fault (:attr:`ConfigError.key`).
    """
    _check_mqtt(cfg.mqtt)
    _check_kafka(cfg.kafka)
    s = cfg.sink
    if s.retry_max < s.retry_initial:
        reason = f"must be >= sink.retry_initial ({s.retry_initial:g})"
        raise ConfigError.at("sink.retry_max", reason)
    _check_url("sink.dps.base_url", s.dps.base_url)
    if not s.dps.app_secret.reveal():
        raise ConfigError.at("sink.dps.app_secret", "must not be empty")
    if s.dps.ca_file is not None:
        _check_readable("sink.dps.ca_file", s.dps.ca_file)
        client_context(TlsConfig(enabled=True, ca_file=s.dps.ca_file), key="sink.dps")
    # The mapping's own rules (one place: pipeline.core.mapping), now rather than when
    # the sink starts.
    check_settings(sn_from=s.sn_from, org_id=s.org_id, device_data=s.device_data)


def _check_mqtt(m: MqttConfig) -> None:
    _check_gateways(m)
    if m.reconnect_max < m.reconnect_min:
        reason = f"must be >= mqtt.reconnect_min ({m.reconnect_min:g})"
        raise ConfigError.at("mqtt.reconnect_max", reason)
    if m.iotda is not None and m.iotda.timestamp is not None:
        try:
            dt.datetime.strptime(m.iotda.timestamp, "%Y%m%d%H").replace(tzinfo=dt.UTC)
        except ValueError:
            reason = f"{m.iotda.timestamp!r} is not a date and hour (YYYYMMDDHH)"
            raise ConfigError.at("mqtt.iotda.timestamp", reason) from None
    publishes = m.sync_requests == "on" or (m.sync_requests == "auto" and m.iotda is not None)
    if publishes and not m.topic.endswith("/down"):
        reason = f"mqtt.topic {m.topic!r} does not end in /down: no up topic to publish on"
        raise ConfigError.at("mqtt.sync_requests", reason)
    if m.tls.enabled:
        _check_tls("mqtt.tls", m.tls)


def _check_kafka(k: KafkaConfig) -> None:
    for server in k.bootstrap_servers.split(","):
        _check_address("kafka.bootstrap_servers", server.strip())
    sasl = k.security_protocol.startswith("SASL_")
    if sasl and k.sasl_mechanism is None:
        reason = f"required with kafka.security_protocol {k.security_protocol}"
        raise ConfigError.at("kafka.sasl_mechanism", reason)
    if not sasl and k.sasl_mechanism is not None:
        reason = f"set, but kafka.security_protocol is {k.security_protocol} (not SASL_...)"
        raise ConfigError.at("kafka.sasl_mechanism", reason)
    if sasl:
        for key, value in (("sasl_username", k.sasl_username), ("sasl_password", k.sasl_password)):
            if not value:
                reason = f"required with SASL {k.sasl_mechanism}"
                raise ConfigError.at("kafka." + key, reason)
    if k.tls.enabled or k.security_protocol.endswith("SSL"):
        _check_tls("kafka.tls", k.tls)
    names: dict[str, str] = {}
    for field in Topics.__struct_fields__:
        name = getattr(k.topics, field)
        if name in names:
            reason = f"{name!r} is also kafka.topics.{names[name]}; every topic needs its own"
            raise ConfigError.at("kafka.topics." + field, reason)
        names[name] = field


def _check_address(key: str, address: str) -> None:
    host, colon, port = address.rpartition(":")
    if not colon:
        host, port = address, "9092"
    if not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:  # noqa: PLR2004
        reason = f"{address!r} is not host:port with a port from 1 to 65535"
        raise ConfigError.at(key, reason)


def _check_url(key: str, url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        reason = f"{url!r} is not an http:// or https:// URL with a host"
        raise ConfigError.at(key, reason)


def _check_tls(key: str, tls: TlsConfig) -> None:
    if tls.key_file and not tls.cert_file:
        reason = f"set without {key}.cert_file"
        raise ConfigError.at(key + ".key_file", reason)
    for name in ("ca_file", "cert_file", "key_file"):
        if (path := getattr(tls, name)) is not None:
            _check_readable(f"{key}.{name}", path)
    # Readable is not enough: load them as the clients will (one place: pipeline.tls).
    client_context(tls, key=key)


def _check_readable(key: str, path: str) -> None:
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        reason = f"cannot read {path}: {exc.strerror}"
        raise ConfigError.at(key, reason) from None
