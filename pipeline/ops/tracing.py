"""Traces: W3C trace context through MQTT, Kafka and DPS; OpenTelemetry spans when on.

Every record the pipeline writes carries the ``traceparent`` header (and ``tracestate``
when there is one), in the W3C format; an MQTT 5 message carries them as user
properties of the same names. A stage handles each message or record as a :class:`Hop`
of its trace, opened with :meth:`Tracing.receive` (ingest, one MQTT message) or
:meth:`Tracing.process` (one Kafka record); while it is open, every log line carries
its ``trace_id`` and ``span_id`` and :func:`current` gives it to the code below (the
DPS client, the outcome writer).

- **Off** (``[tracing] enabled = false``, the default, or ``OTEL_SDK_DISABLED=true``):
  no OpenTelemetry object is made; a hop is the ``traceparent`` it came with, passed
  along unchanged. Ingest starts one (flags ``00``: not sampled) for a message that
  brought none, so every record and log line of a device's journey shares a trace id.
- **On**: each hop is a span (messaging semantic conventions: ``receive`` for the MQTT
  message, ``process`` for a Kafka record, ``send`` for each record written), the DPS
  calls are HTTP client spans inside the sink's, and spans go to the OTLP/HTTP exporter
  through a batch processor, flushed when the stage stops. The standard environment
  configures it: ``OTEL_SERVICE_NAME`` (default ``pipeline-{stage}``),
  ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_SAMPLER`` (``parentbased_traceidratio``
  with ``OTEL_TRACES_SAMPLER_ARG`` in production).

  A hop the sampler would not record costs what tracing off costs: with a parent-based
  sampler (the SDK's default for ``OTEL_TRACES_SAMPLER``'s ``parentbased_*``), a valid
  parent whose sampled flag is 0 is passed along unchanged, as when off, and no SDK span
  is made; a new trace whose root sampler is ``traceidratio`` (or always off) is asked
  once, on its fresh trace id, and only a sampled one becomes a span (of that trace id).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
from typing import TYPE_CHECKING, Any, Self

from pipeline.core.tracecontext import TRACEPARENT, TRACESTATE, valid

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from pipeline.config import TracingConfig

__all__ = [
    "OFF",
    "TRACEPARENT",
    "TRACESTATE",
    "Call",
    "Hop",
    "Tracing",
    "current",
    "exemplar",
    "from_mqtt",
    "log_ids",
    "start",
    "valid",
]

MQTT_DOWN = "$oc/devices/{device_id}/sys/events/down"
"""The MQTT destination template (a span name must not hold the gateway)."""

_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_ATTRIBUTES = {
    "gateway_id": "iotda.gateway_id",
    "event_id": "iotda.event_id",
    "sn": "dps.sn",
    "code": "dps.code",
}
"""The project's own span attributes, by the keyword :meth:`Hop.describe` takes."""

_current: contextvars.ContextVar[Hop | None] = contextvars.ContextVar("pipeline_hop", default=None)


_DRAWN = 256
"""Traceparents made at once (ingest starts one per message that brought none)."""
_ready: list[str] = []


def _draw() -> None:
    """Make :data:`_DRAWN` fresh traceparents from one random draw."""
    ids = random.getrandbits(192 * _DRAWN).to_bytes(24 * _DRAWN).hex()
    fresh = [f"00-{ids[i : i + 32]}-{ids[i + 32 : i + 48]}-00" for i in range(0, len(ids), 48)]
    if _ZERO_SPAN in ids:  # all-zero ids are invalid (a false alarm costs only this check)
        fresh = [tp for tp in fresh if tp[3:35] != _ZERO_TRACE and tp[36:52] != _ZERO_SPAN]
    _ready.extend(fresh)


def _new_traceparent() -> str:
    """A fresh, unsampled W3C traceparent (random ids; the all-zero ones are invalid)."""
    if not _ready:
        _draw()
    return _ready.pop()


def _sampled(traceparent: str) -> bool:
    """Whether a valid ``traceparent``'s flags have the sampled bit."""
    return bool(int(traceparent[53:55], 16) & 1)


def _from_headers(headers: Sequence[tuple[str, bytes]] | None) -> tuple[str | None, str | None]:
    """(traceparent, tracestate) of a Kafka record's headers, as text."""
    parent = state = None
    for name, value in headers or ():
        if name == TRACEPARENT:
            parent = value.decode("ascii", "replace")
        elif name == TRACESTATE:
            state = value.decode("ascii", "replace")
    return parent, state


def from_mqtt(properties: object) -> tuple[str | None, str | None]:
    """(traceparent, tracestate) of an MQTT 5 message's user properties (None: absent).

    ``properties`` is paho's ``Properties`` of the message (aiomqtt's
    ``Message.properties``), or None (MQTT 3.1.1 has no properties).
    """
    parent = state = None
    for name, value in getattr(properties, "UserProperty", None) or ():
        if name == TRACEPARENT:
            parent = value
        elif name == TRACESTATE:
            state = value
    return parent, state


class Hop:
    """One message or record's place in its trace, while a stage handles it.

    This is the hop of tracing off: the ``traceparent`` is passed along unchanged and
    every method that would touch a span does nothing. A hop of tracing on
    (:class:`_SpanHop`) is a span.
    """

    __slots__ = ("_headers", "_token", "traceparent", "tracestate")

    def __init__(self, traceparent: str, tracestate: str | None = None) -> None:
        self.traceparent = traceparent
        self.tracestate = tracestate
        self._headers: list[tuple[str, bytes]] | None = None
        self._token: contextvars.Token[Hop | None] | None = None

    def __enter__(self) -> Self:
        """Make this the hop being handled (log lines, :func:`current`) until the block ends."""
        self._token = _current.set(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        """The trace context headers of a record written for this hop (do not change it)."""
        if self._headers is None:
            self._headers = [(TRACEPARENT, self.traceparent.encode())]
            if self.tracestate:
                self._headers.append((TRACESTATE, self.tracestate.encode()))
        return self._headers

    def ids(self) -> tuple[str, str]:
        """(trace_id, span_id), as 32 and 16 hex digits: what a log line carries."""
        tp = self.traceparent
        return tp[3:35], tp[36:52]

    def describe(self, **attributes: str | int | None) -> None:
        """Set the project's attributes (``gateway_id``, ``event_id``, ``sn``, ``code``)."""

    def fail(self, reason: str, *, code: int | None = None) -> None:
        """This message or record failed (dead-lettered, rejected): the span says why."""

    def send(self, topic: str, key: bytes | str | None = None) -> Hop:
        """A record about to be written to ``topic``: its own hop (a ``send`` span when on).

        Write the record with the returned hop's :attr:`headers`; then call its
        :meth:`watch` with the send's future, or :meth:`sent` with Kafka's answer.
        """
        return self

    def watch(self, future: asyncio.Future[Any]) -> None:
        """End this ``send`` hop when ``future`` (aiokafka's send) completes."""

    def sent(self, metadata: Any = None, error: BaseException | None = None) -> None:
        """Kafka acknowledged this ``send`` hop's record (``metadata``) or did not."""

    def exemplar(self) -> dict[str, str] | None:
        """A Prometheus exemplar for a metric observed in this hop (sampled traces only)."""
        return None

    @property
    def sampled(self) -> bool:
        """Whether this hop's spans are recorded and exported."""
        return False


class Call:
    """A DPS (HTTP) call in progress: a client span when tracing is on."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """The call ended (raising ``exc``, if it did)."""

    def answered(self, status: int, code: int | None = None) -> None:
        """The HTTP status and DPS code of the answer."""

    def headers(self) -> dict[str, str]:
        """Trace context headers for the HTTP request (none when off)."""
        return {}


_NO_CALL = Call()


class Tracing:
    """A stage's tracing: this one is off (headers passed along, no spans).

    :func:`start` returns one that is on when the configuration says so.
    """

    enabled = False

    def __init__(self, stage: str = "") -> None:
        self.stage = stage

    def receive(self, topic: str, properties: object) -> Hop:
        """The hop of one MQTT message received on ``topic``, to handle ``with`` it.

        It continues the trace of the message's ``traceparent`` user property (MQTT 5;
        ``properties`` is aiomqtt's ``Message.properties``), or starts one.
        """
        parent, state = from_mqtt(properties)
        return Hop(parent, state) if parent and valid(parent) else Hop(_new_traceparent())

    def process(self, record: Any, *, group: str | None = None) -> Hop:
        """The hop of one Kafka record (aiokafka's) consumed as ``group``, to handle ``with`` it.

        It continues the trace of the record's ``traceparent`` header, or starts one.
        """
        parent, state = _from_headers(record.headers)
        return Hop(parent, state) if parent and valid(parent) else Hop(_new_traceparent())

    def operation(self, name: str, **attributes: str | int) -> Hop:
        """The hop of a tool's run (``redrive allocations``): a root span when on."""
        return Hop(_new_traceparent())

    def resend(self, record: Any, topic: str, *, cause: Hop | None = None) -> Hop:
        """The hop of ``record`` (a DLQ record) written again to ``topic``.

        It continues the trace the record carries (its ``send`` span, when on, links to
        ``cause``: the redrive's hop); end it with :meth:`Hop.sent`.
        """
        parent, state = _from_headers(record.headers)
        return Hop(parent, state) if parent and valid(parent) else Hop(_new_traceparent())

    def call(self, method: str, url: Any, *, sn: str | None = None) -> Call:
        """One HTTP call to DPS (``url``: a ``yarl.URL``) in the current hop, ``with`` it."""
        return _NO_CALL

    async def close(self) -> None:
        """Export the spans still buffered, and stop (at the stage's stop)."""


OFF = Tracing()
"""Tracing off: what a stage, tool or client uses unless told otherwise."""


def current() -> Hop:
    """The hop being handled in this task (a fresh, unsampled one outside any)."""
    hop = _current.get()
    return hop if hop is not None else Hop(_new_traceparent())


def log_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the hop being handled in this task, if any."""
    hop = _current.get()
    return hop.ids() if hop is not None else None


def exemplar() -> dict[str, str] | None:
    """A Prometheus exemplar (``{"trace_id": ...}``) for the hop in this task, if sampled."""
    hop = _current.get()
    return hop.exemplar() if hop is not None else None


def start(stage: str, cfg: TracingConfig, *, exporter: SpanExporter | None = None) -> Tracing:
    """The tracing of ``stage``: on when ``[tracing] enabled`` and the SDK is not disabled.

    Args:
        stage: ``ingest``, ``route``, ``sink``, ``redrive``...: the default service name
            is ``pipeline-{stage}`` (``OTEL_SERVICE_NAME`` overrides it).
        cfg: the ``[tracing]`` section.
        exporter: where spans go (tests); the OTLP/HTTP exporter by default, configured
            by the ``OTEL_EXPORTER_OTLP_*`` environment.
    """
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if not cfg.enabled or disabled:
        return Tracing(stage)
    return _SpanTracing(stage, exporter)


# -- Tracing on: OpenTelemetry's SDK, imported only when a stage turns it on ----------


def _header_of(span: Span) -> tuple[str, str | None]:
    """(traceparent, tracestate) that hand ``span`` on as the parent."""
    context = span.get_span_context()
    state = context.trace_state.to_header() if context.trace_state else None
    parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    return parent, state or None


class _SpanHop(Hop):
    """A hop that is a span (tracing on)."""

    __slots__ = ("_otel", "span")

    def __init__(self, otel: _SpanTracing, span: Span) -> None:
        super().__init__(*_header_of(span))
        self._otel = otel
        self.span = span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(kind, exc, tb)
        if exc is not None:
            self._otel.failed(self.span, exc)
        self.span.end()

    def describe(self, **attributes: str | int | None) -> None:
        for name, value in attributes.items():
            if value is not None:
                self.span.set_attribute(_ATTRIBUTES.get(name, name), value)

    def fail(self, reason: str, *, code: int | None = None) -> None:
        if code is not None:
            self.span.set_attribute("dps.code", code)
        self._otel.error(self.span, reason)

    def send(self, topic: str, key: bytes | str | None = None) -> Hop:
        return self._otel.send(self.span, topic, key)

    def watch(self, future: asyncio.Future[Any]) -> None:
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.sent(error=asyncio.CancelledError())
        elif (error := future.exception()) is not None:
            self.sent(error=error)
        else:
            self.sent(future.result())

    def sent(self, metadata: Any = None, error: BaseException | None = None) -> None:
        span = self.span
        if metadata is not None:
            span.set_attribute("messaging.destination.partition.id", str(metadata.partition))
            span.set_attribute("messaging.kafka.offset", metadata.offset)
        if error is not None:
            self._otel.failed(span, error)
        span.end()

    def exemplar(self) -> dict[str, str] | None:
        context = self.span.get_span_context()
        return {"trace_id": f"{context.trace_id:032x}"} if context.trace_flags.sampled else None

    @property
    def sampled(self) -> bool:
        return bool(self.span.get_span_context().trace_flags.sampled)


class _SpanCall(Call):
    """An HTTP client span (tracing on)."""

    __slots__ = ("_otel", "span")

    def __init__(self, otel: _SpanTracing, span: Span) -> None:
        self._otel = otel
        self.span = span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._otel.failed(self.span, exc)
        self.span.end()

    def answered(self, status: int, code: int | None = None) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if code is not None:
            self.span.set_attribute("dps.code", code)
        if status >= 400:  # noqa: PLR2004  (HTTP's client errors and above)
            self.span.set_attribute("error.type", str(status))
            self._otel.error(self.span, f"HTTP {status}" + (f", DPS code {code}" if code else ""))
        elif code:
            self.span.set_attribute("error.type", f"dps.{code}")
            self._otel.error(self.span, f"DPS code {code}")

    def headers(self) -> dict[str, str]:
        parent, state = _header_of(self.span)
        return {TRACEPARENT: parent, TRACESTATE: state} if state else {TRACEPARENT: parent}


class _SpanTracing(Tracing):
    """A stage's tracing, on: spans through OpenTelemetry's SDK."""

    enabled = True

    def __init__(self, stage: str, exporter: SpanExporter | None) -> None:
        super().__init__(stage)
        # The SDK and the exporter (requests, protobuf) take about 0.15 s to import:
        # only a stage that traces pays it.
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: f"pipeline-{stage}"}))
        self._ids = _ids()
        # The sampler is the one OTEL_TRACES_SAMPLER names.
        self.provider = TracerProvider(resource=resource, id_generator=self._ids)
        self._pass_unsampled, self._root_bound = _shortcuts(os.environ)
        self.provider.add_span_processor(BatchSpanProcessor(exporter or _default_exporter()))
        self._tracer = self.provider.get_tracer("pipeline")
        self._api = trace
        self._propagator = TraceContextTextMapPropagator()

    def error(self, span: Span, reason: str) -> None:
        """Set ``span``'s status to error, saying why."""
        span.set_status(self._api.Status(self._api.StatusCode.ERROR, reason))

    def failed(self, span: Span, exc: BaseException) -> None:
        """``span`` ended with ``exc``."""
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__name__)
        self.error(span, f"{type(exc).__name__}: {exc}")

    def _unsampled(self, parent: str | None, state: str | None) -> Hop | None:
        """The hop of tracing off when the sampler would not record this one, else None.

        ``parent`` valid and not sampled, under a parent-based sampler: passed along
        unchanged. No valid ``parent`` (a new trace), under a root sampler that decides on
        the trace id alone: a fresh trace id asked once; a sampled one is the trace id of
        the span :meth:`_span` makes next.
        """
        if parent and valid(parent):
            if self._pass_unsampled and not _sampled(parent):
                return Hop(parent, state)
            return None
        if self._root_bound is None:
            return None
        fresh = _new_traceparent()
        trace_id = int(fresh[3:35], 16)
        if trace_id & _TRACE_ID_LIMIT < self._root_bound:
            self._ids.next_trace_id = trace_id  # the sampler's answer will be the same
            return None
        return Hop(fresh)

    def _parent(self, parent: str | None, state: str | None) -> Any:
        """The context to start a span in: the one ``parent`` names, or none (a new trace)."""
        if not (parent and valid(parent)):
            return None
        carrier = {TRACEPARENT: parent, TRACESTATE: state} if state else {TRACEPARENT: parent}
        return self._propagator.extract(carrier)

    def _span(self, name: str, kind: str, context: Any, attributes: dict[str, Any]) -> Span:
        return self._tracer.start_span(
            name, context=context, kind=self._api.SpanKind[kind], attributes=attributes
        )

    def send(self, parent: Span, topic: str, key: bytes | str | None) -> Hop:
        """A ``send`` span under ``parent``, for a record to ``topic``."""
        attributes = _kafka("send", topic)
        if key is not None:
            attributes["messaging.kafka.message.key"] = _text(key)
        context = self._api.set_span_in_context(parent)
        return _SpanHop(self, self._span(f"send {topic}", "PRODUCER", context, attributes))

    def receive(self, topic: str, properties: object) -> Hop:
        attributes = {
            "messaging.system": "mqtt",
            "messaging.operation.type": "receive",
            "messaging.operation.name": "receive",
            "messaging.destination.name": topic,
            "messaging.destination.template": MQTT_DOWN,
        }
        parent, state = from_mqtt(properties)
        if (hop := self._unsampled(parent, state)) is not None:
            return hop
        context = self._parent(parent, state)
        return _SpanHop(self, self._span(f"receive {MQTT_DOWN}", "CONSUMER", context, attributes))

    def process(self, record: Any, *, group: str | None = None) -> Hop:
        parent, state = _from_headers(record.headers)
        if (hop := self._unsampled(parent, state)) is not None:
            return hop
        attributes = _kafka("process", record.topic)
        attributes["messaging.destination.partition.id"] = str(record.partition)
        attributes["messaging.kafka.offset"] = record.offset
        if group is not None:
            attributes["messaging.consumer.group.name"] = group
        if record.key is not None:
            attributes["messaging.kafka.message.key"] = _text(record.key)
        context = self._parent(parent, state)
        return _SpanHop(
            self, self._span(f"process {record.topic}", "CONSUMER", context, attributes)
        )

    def operation(self, name: str, **attributes: str | int) -> Hop:
        if (hop := self._unsampled(None, None)) is not None:
            return hop
        return _SpanHop(self, self._span(name, "INTERNAL", None, dict(attributes)))

    def resend(self, record: Any, topic: str, *, cause: Hop | None = None) -> Hop:
        parent, state = _from_headers(record.headers)
        if (hop := self._unsampled(parent, state)) is not None:
            return hop
        attributes = _kafka("send", topic)
        attributes["pipeline.redriven_from"] = f"{record.topic}/{record.partition}/{record.offset}"
        links = (
            [self._api.Link(cause.span.get_span_context())] if isinstance(cause, _SpanHop) else []
        )
        span = self._tracer.start_span(
            f"send {topic}",
            context=self._parent(parent, state),
            kind=self._api.SpanKind.PRODUCER,
            attributes=attributes,
            links=links,
        )
        return _SpanHop(self, span)

    def call(self, method: str, url: Any, *, sn: str | None = None) -> Call:
        hop = _current.get()
        if hop is not None and not isinstance(hop, _SpanHop):
            return _NO_CALL  # a hop the sampler did not record: nor is its call
        context = self._api.set_span_in_context(hop.span) if hop is not None else None
        # url.full never holds credentials (semantic conventions): userinfo is dropped.
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.full": str(url.with_user(None)),
            "url.template": url.path,
            "server.address": url.host or "",
            "server.port": url.port or 0,
        }
        if sn is not None:
            attributes["dps.sn"] = sn
        return _SpanCall(self, self._span(f"{method} {url.path}", "CLIENT", context, attributes))

    async def close(self) -> None:
        # The exporter posts synchronously: off the event loop.
        await asyncio.to_thread(self.provider.shutdown)


_TRACE_ID_LIMIT = (1 << 64) - 1
"""The trace id bits ``TraceIdRatioBased`` decides on (its ``TRACE_ID_LIMIT``)."""


def _shortcuts(environ: Mapping[str, str]) -> tuple[bool, int | None]:
    """What :meth:`_SpanTracing._unsampled` may decide without the SDK.

    For the sampler ``OTEL_TRACES_SAMPLER`` (and ``OTEL_TRACES_SAMPLER_ARG``) name:
    (whether a remote parent that is not sampled is dropped: every ``parentbased_*``
    sampler's default; the bound a new trace id's low 64 bits must be under to be
    sampled, when the root sampler decides on the trace id alone, else None). Read from
    the names the specification gives, as the SDK reads them, not from the SDK's
    objects (their parts are private); a sampler of another name gets no shortcut.
    """
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased  # noqa: PLC0415

    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    root = name.removeprefix("parentbased_")
    pass_unsampled = name != root
    if root == "always_off":
        return pass_unsampled, 0
    if root == "traceidratio":
        try:
            ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0  # as the SDK does with an unreadable ratio
        if not 0.0 <= ratio <= 1.0:
            ratio = 1.0
        return pass_unsampled, TraceIdRatioBased(ratio).bound
    if root == "always_on":
        return pass_unsampled, None
    return False, None  # a sampler of its own (an entry point): the SDK decides


def _ids() -> Any:
    """The SDK's random ids, with a trace id chosen beforehand for the next span, if set."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator  # noqa: PLC0415

    class Ids(RandomIdGenerator):
        next_trace_id = 0

        def generate_trace_id(self) -> int:
            chosen, self.next_trace_id = self.next_trace_id, 0
            return chosen or super().generate_trace_id()

    return Ids()


def _kafka(operation: str, topic: str) -> dict[str, Any]:
    """The messaging attributes every Kafka span has."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": topic,
    }


def _default_exporter() -> SpanExporter:
    """OTLP over HTTP, configured by the ``OTEL_EXPORTER_OTLP_*`` environment."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    return OTLPSpanExporter()


def _text(key: bytes | str) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key
