"""``pipeline redrive`` that stops in its second transaction, for the tests to act there.

``python -m tests.tools.paused_redrive ARGS...`` runs the command line ``pipeline
ARGS...``, except that the second time a transaction adds its offsets (every send of that
batch made and acknowledged, none committed), it prints ``paused`` and waits for a line
on stdin before going on: the test SIGKILLs it there, or lets it go on after another run
took over.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiokafka import AIOKafkaProducer

from pipeline.cli import main

_original = AIOKafkaProducer.send_offsets_to_transaction
_calls = 0


async def _paused(self: AIOKafkaProducer, offsets: Any, group_id: str) -> None:
    global _calls  # noqa: PLW0603  (one process, one pause)
    _calls += 1
    if _calls == 2:
        print("paused", flush=True)  # noqa: T201
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await _original(self, offsets, group_id)


if __name__ == "__main__":
    AIOKafkaProducer.send_offsets_to_transaction = _paused
    sys.exit(main(sys.argv[1:]))
