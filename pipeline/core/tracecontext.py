"""The W3C trace context a record carries (``traceparent``, ``tracestate``): one parser.

The stages write it (:mod:`pipeline.ops.tracing`) and continue only a strictly valid
one; the tools that read the topics back (``pipeline trace``, ``pipeline audit``) show
the trace id of whatever a record carries, so their reading forgives case and version.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["TRACEPARENT", "TRACESTATE", "record_trace_id", "trace_id", "valid"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_VALID = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_READ = re.compile(rb"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO = b"0" * 32


def valid(traceparent: str | None) -> bool:
    """Whether ``traceparent`` is a W3C traceparent this pipeline continues (version 00)."""
    return traceparent is not None and _VALID.fullmatch(traceparent) is not None


def trace_id(traceparent: bytes | None) -> str | None:
    """The trace id of a ``traceparent`` value, or None when there is no readable one."""
    if not traceparent:
        return None
    match = _READ.fullmatch(traceparent.strip().lower())
    if match is None or match[1] == _ZERO:
        return None
    return match[1].decode()


def record_trace_id(headers: Iterable[tuple[str, bytes]] | None) -> str | None:
    """The trace id of a Kafka record's ``traceparent`` header, or None without one."""
    for name, value in headers or ():
        if name == TRACEPARENT:
            return trace_id(bytes(value))
    return None
