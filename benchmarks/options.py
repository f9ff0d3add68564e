"""The sizes of a bench run (no imports beyond the standard library: the CLI reads the defaults)."""

from __future__ import annotations

import dataclasses

__all__ = ["Options"]


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """Sizes of a bench run (``python -m benchmarks --help`` describes each)."""

    rounds: int = 3
    only: tuple[str, ...] = ("ingest", "route", "sink")
    """The stages measured against their ceilings in the rounds (all three by default)."""
    messages: int = 10_000
    events: int = 10_000
    allocations: int = 4000
    decode_reps: int = 7
    sustain: int = 1500
    rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    rate_seconds: float = 5.0
    latency_rounds: int = 2
    burst: int = 25_000
    burst_settle: float = 10.0
    mosquitto: str = "own"
    """``own``: the bench's own Mosquittos (one saving every second, one with the policy);
    ``configured``: the configured one (:mod:`.services`)."""
    baseline: str | None = None
    """A git ref whose end-to-end sustained rate is measured beside this checkout's."""
    together: bool = False
    """End to end with the three stages in one ``pipeline run`` process instead of three."""
    replicas: bool = False
    """Measure throughput against the number of replicas instead (:mod:`.replicas`)."""
    limit: float = 180.0
    """Seconds any one measurement may take before the bench gives up."""
