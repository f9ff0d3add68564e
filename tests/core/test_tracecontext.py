"""The one parser of the W3C trace context records carry (writers strict, readers lenient)."""

from __future__ import annotations

import pytest

from pipeline.core.tracecontext import record_trace_id, trace_id, valid

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01".encode(), TRACE),
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-00".encode(), TRACE),  # read, not continued
        (f"01-{TRACE}-00f067aa0ba902b7-01 ".encode(), TRACE),  # another version, padded
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", None),  # all zero: invalid
        (b"00-4bf92f35-00f067aa0ba902b7-01", None),
        (f"00-zz{TRACE[2:]}-00f067aa0ba902b7-01".encode(), None),
        (b"\xff-\xff", None),
        (b"not a traceparent", None),
        (b"", None),
        (None, None),
    ],
)
def test_the_tools_read_the_trace_id_of_whatever_a_record_carries(
    header: bytes | None, expected: str | None
) -> None:
    assert trace_id(header) == expected
    headers = None if header is None else [("other", b"x"), ("traceparent", header)]
    assert record_trace_id(headers) == expected
    assert record_trace_id([("other", b"x")]) is None


@pytest.mark.parametrize(
    ("traceparent", "continued"),
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01", True),
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", False),
        (f"01-{TRACE}-00f067aa0ba902b7-01", False),
        (f"00-{TRACE}-0000000000000000-01", False),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", False),
        (None, False),
    ],
)
def test_the_stages_continue_only_a_strictly_valid_traceparent(
    traceparent: str | None, continued: bool
) -> None:
    assert valid(traceparent) is continued
