"""Sink stage: allocate added children in DPS, release deleted ones, committing safely.

One job per module:

- :mod:`.worker`: the loop that ties them (intake and back-pressure, commits, rebalance);
- :mod:`.offsets`: the contiguous-prefix tracker that says which offsets may be committed;
- :mod:`.breaker`: pauses the sink while DPS fails for everyone, one probe per period;
- :mod:`.limiter`: the call rate, at most ``sink.rate_limit``, lowered by throttling;
- :mod:`.allocator`: per-sn exclusivity, call slots and the retry loop of one record;
- :mod:`.releaser`: deleted children, as ``sink.on_delete`` says, batched per group;
- :mod:`.lifecycle`: each child's latest generation, one operation per child at a time;
- :mod:`.outcomes`: writing allocations, releases and DLQ records, with their ``source``
  header;
- :mod:`.recovery`: reading back the group's recorded outcomes after a crash.
"""

from pipeline.stages.sink.breaker import Breaker
from pipeline.stages.sink.offsets import OffsetTracker
from pipeline.stages.sink.outcomes import source_header
from pipeline.stages.sink.worker import Sink

__all__ = ["Breaker", "OffsetTracker", "Sink", "source_header"]
