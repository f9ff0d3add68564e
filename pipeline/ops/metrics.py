"""Prometheus metrics of every stage, defined once (names are part of the operator contract)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "INGEST_EVENTS",
    "INGEST_INFLIGHT",
    "INGEST_MESSAGES",
    "MQTT_CONNECTED",
    "MQTT_RECONNECTS",
    "ROUTER_CHILDREN",
    "ROUTER_DUPLICATES",
    "ROUTER_RECORDS",
    "ROUTER_SKIPPED",
    "ROUTER_TRANSACTIONS",
    "SINK_BREAKER_OPENS",
    "SINK_CALLS",
    "SINK_CALL_SECONDS",
    "SINK_INFLIGHT",
    "SINK_OUTCOMES",
    "SINK_PAUSED",
    "SINK_RATE",
    "SINK_RETRIES",
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
MQTT_CONNECTED = Gauge("pipeline_mqtt_connected", "1 while connected to the MQTT broker")
MQTT_RECONNECTS = Counter("pipeline_mqtt_reconnects", "MQTT connection losses")

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
