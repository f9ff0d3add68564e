"""Prometheus metrics of every stage, defined once (names are part of the operator contract)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, write_to_textfile

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = [
    "CONSUMER_LAG",
    "INGEST_EVENTS",
    "INGEST_INFLIGHT",
    "INGEST_MESSAGES",
    "MQTT_BRIDGE_UP",
    "MQTT_CONNECTED",
    "MQTT_RECONNECTS",
    "ROUTER_CHILDREN",
    "ROUTER_DUPLICATES",
    "ROUTER_GAPS_OPEN",
    "ROUTER_RECORDS",
    "ROUTER_SKIPPED",
    "ROUTER_SKIPPED_CHILDREN",
    "ROUTER_STALE_NOTIFICATIONS",
    "ROUTER_TRANSACTIONS",
    "ROUTER_VERSIONS_MISSING",
    "ROUTER_VERSION_GAPS",
    "SINK_BREAKER_OPENS",
    "SINK_CALLS",
    "SINK_CALL_SECONDS",
    "SINK_DETACHED",
    "SINK_DETACHES",
    "SINK_INFLIGHT",
    "SINK_OUTCOMES",
    "SINK_PAUSED",
    "SINK_RATE",
    "SINK_RETRIES",
    "SINK_SOFT_DEADLINE",
    "STAGE_LAST_PROGRESS",
    "STAGE_WORK_WAITING",
    "UNEXPECTED_ERRORS",
    "report_lag",
    "write_audit_metrics",
]

INGEST_MESSAGES = Counter(
    "pipeline_ingest_messages", "MQTT messages handled by ingest", ["outcome"]
)  # outcome: landed | dlq
INGEST_EVENTS = Counter(
    "pipeline_ingest_events", "Services seen in landed messages", ["service_id", "event_type"]
)
INGEST_INFLIGHT = Gauge(
    "pipeline_ingest_inflight", "MQTT messages received but not yet acknowledged (awaiting Kafka)"
)
MQTT_CONNECTED = Gauge(
    "pipeline_mqtt_connected",
    "1 while the MQTT session is connected (session: ingest, or the gateway in device mode)",
    ["session"],
)
MQTT_RECONNECTS = Counter(
    "pipeline_mqtt_reconnects",
    "MQTT sessions that ended or failed to connect, by why",
    ["session", "reason"],
)  # reason: refused (the broker said no: credentials, ACL) | lost | kafka
MQTT_BRIDGE_UP = Gauge(
    "pipeline_mqtt_bridge_up",
    "1 while the edge broker reports its bridge to IoTDA connected (mqtt.bridge_state)",
    ["bridge"],
)

ROUTER_RECORDS = Counter("pipeline_router_records", "Down-event records consumed", ["outcome"])
ROUTER_CHILDREN = Counter("pipeline_router_children", "Child records emitted", ["kind"])
ROUTER_DUPLICATES = Counter(
    "pipeline_router_duplicate_events", "Redelivered (gateway, event_id) pairs skipped"
)
ROUTER_SKIPPED = Counter(
    "pipeline_router_skipped_events", "Events that yield no children", ["service_id", "event_type"]
)
ROUTER_TRANSACTIONS = Counter(
    "pipeline_router_transactions", "Kafka transactions", ["outcome"]
)  # committed | aborted
ROUTER_SKIPPED_CHILDREN = Counter(
    "pipeline_router_skipped_children",
    "Children of an add or delete skipped: already in that state (duplicate), or already "
    "decided by a later notification (superseded)",
    ["why"],
)
ROUTER_STALE_NOTIFICATIONS = Counter(
    "pipeline_router_stale_notifications",
    "Notifications skipped whole: their gateway's version was already seen",
)
ROUTER_VERSION_GAPS = Counter(
    "pipeline_router_version_gaps",
    "Gaps in a gateway's notification versions (each answered with a sync request)",
)
ROUTER_GAPS_OPEN = Gauge(
    "pipeline_router_version_gaps_open", "Gateways with notification versions still missing"
)
ROUTER_VERSIONS_MISSING = Gauge(
    "pipeline_router_versions_missing", "Notification versions missing, over every gateway"
)

SINK_CALLS = Counter(
    "pipeline_sink_calls", "DPS allocate calls", ["result"]
)  # ok | rejected | transient | throttled
SINK_CALL_SECONDS = Histogram(
    "pipeline_sink_call_seconds",
    "DPS allocate call latency",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_OUTCOMES = Counter("pipeline_sink_outcomes", "Records finished", ["outcome"])
SINK_RETRIES = Counter("pipeline_sink_retries", "Allocate attempts that will be retried")
SINK_INFLIGHT = Gauge(
    "pipeline_sink_inflight", "Records in progress (calling, waiting to retry, or queued)"
)
SINK_PAUSED = Gauge("pipeline_sink_paused", "1 while consumption is paused because DPS is failing")
SINK_BREAKER_OPENS = Counter(
    "pipeline_sink_breaker_opens", "Times the breaker opened because DPS failed for everyone"
)
SINK_RATE = Gauge(
    "pipeline_sink_rate_limit", "Allocate calls per second currently allowed (0: unlimited)"
)
SINK_DETACHED = Gauge(
    "pipeline_sink_detached_calls",
    "DPS calls past the soft deadline that gave their call slot back and are still pending",
)
SINK_DETACHES = Counter(
    "pipeline_sink_detaches", "DPS calls that gave their call slot back past the soft deadline"
)
SINK_SOFT_DEADLINE = Gauge(
    "pipeline_sink_soft_deadline_seconds",
    "Seconds after which a pending DPS call gives its call slot back (sink.dps.timeout: never)",
)

UNEXPECTED_ERRORS = Counter(
    "pipeline_unexpected_errors",
    "Bugs met while handling one message or record (it was dead-lettered; the stage went on)",
    ["stage"],
)

# Every known label value starts at 0, so the first increment is a visible increase:
# Prometheus cannot see the step of a series whose first sample already holds it (the
# first DLQ record would never fire an alert).
for _counter, _values in (
    (INGEST_MESSAGES, ("landed", "dlq")),
    (ROUTER_RECORDS, ("routed", "dlq")),
    (ROUTER_CHILDREN, ("added", "failed", "deleted")),
    (ROUTER_SKIPPED_CHILDREN, ("duplicate", "superseded")),
    (ROUTER_TRANSACTIONS, ("committed", "aborted")),
    (SINK_CALLS, ("ok", "rejected", "transient", "throttled")),
    (
        SINK_OUTCOMES,
        (
            "allocated",
            "rejected",
            "exhausted",
            "invalid",
            "already_recorded",
            "superseded",
            "release_recorded",
            "release_reset",
            "release_deleted",
            "release_not_allocated",
            "release_superseded",
        ),
    ),
    (UNEXPECTED_ERRORS, ("ingest", "route", "sink")),
):
    for _value in _values:
        _counter.labels(_value)

# What deploy/monitoring's alerts read besides the counters above (names and labels are
# part of the operator contract: tests/ops/test_prometheus.py scrapes them for real).
CONSUMER_LAG = Gauge(
    "pipeline_consumer_lag",
    "Records of an assigned partition that the stage's consumer group has not committed",
    ["stage", "topic", "partition"],
)
STAGE_LAST_PROGRESS = Gauge(
    "pipeline_stage_last_progress_timestamp_seconds",
    "Unix time of the stage's last progress (a record handled, or an idle poll)",
    ["stage"],
)
STAGE_WORK_WAITING = Gauge(
    "pipeline_stage_work_waiting", "1 while the stage has work it has not finished", ["stage"]
)

_lag_reported: dict[str, set[tuple[str, int]]] = {}


def report_lag(stage: str, lags: Mapping[tuple[str, int], int]) -> None:
    """Set ``pipeline_consumer_lag`` for ``stage``'s partitions; forget those it lost."""
    for topic, partition in _lag_reported.get(stage, set()) - set(lags):
        CONSUMER_LAG.remove(stage, topic, str(partition))
    for (topic, partition), lag in lags.items():
        CONSUMER_LAG.labels(stage, topic, str(partition)).set(lag)
    _lag_reported[stage] = set(lags)


def write_audit_metrics(
    path: Path,
    *,
    children: int,
    deleted: int,
    events: int,
    counts: Mapping[str, int],
    oldest_missing_s: float,
    holds: bool,
    window_s: float,
    duration_s: float,
) -> None:
    """``pipeline audit``'s results as ``pipeline_audit_*`` gauges, in the text format.

    Written to a file of their own (node-exporter's textfile collector reads it), through
    a temporary file renamed over it, so a scrape never sees half of it.
    """
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=registry)

    children_g = gauge(
        "pipeline_audit_children", "Children in the audited window, by topic", ("topic",)
    )
    children_g.labels("added").set(children)
    children_g.labels("deleted").set(deleted)
    gauge("pipeline_audit_events", "add_sub_device_response events in the window").set(events)
    gaps = gauge(
        "pipeline_audit_gaps",
        "Findings by kind: missing (no outcome yet), duplicate (more than one), "
        "unrouted (an event's children not all routed), dead-lettered (waiting for a redrive)",
        ("kind",),
    )
    for kind, count in counts.items():
        gaps.labels(kind).set(count)
    gauge(
        "pipeline_audit_oldest_missing_seconds",
        "How long the oldest child without an outcome has waited (0 when none)",
    ).set(oldest_missing_s)
    gauge("pipeline_audit_promise_holds", "1 when the promise held, else 0").set(int(holds))
    gauge("pipeline_audit_window_seconds", "Length of the audited window").set(window_s)
    gauge("pipeline_audit_duration_seconds", "How long the audit took").set(duration_s)
    gauge(
        "pipeline_audit_last_run_timestamp_seconds", "When the audit finished (Unix time)"
    ).set_to_current_time()
    write_to_textfile(str(path), registry)
