"""The bench: each stage against its raw ceiling, end-to-end latency, and memory.

Not part of the ``pipeline`` package (neither the wheel nor the image holds it): run it
from the checkout with ``make bench`` or ``python -m benchmarks`` (:mod:`.cli`).

Machines here are shared and noisy, so every throughput figure is a ratio to a ceiling
measured side by side in the same run: a minimal loop of the same client library doing
only the transport on the same input (:mod:`.ceilings`). Stages and ceilings alternate
over several rounds (:mod:`.stages`); each runs in its own process, so each worker's
peak RSS is its own. Then the three workers run together for the sustained rate, latency
against offered load, and memory after a burst (:mod:`.latency`). :mod:`.report` makes
the document of every figure, its summary (without the per-child latencies) and, from
the summary, the tables and the chart; ``results/`` keeps the summary and the chart of
the latest run, and ``results/raw/`` (untracked) every figure.

Modules: :mod:`.workload` (the input), :mod:`.procs` (child processes and their memory),
:mod:`.measure` (topics, sessions, the broker-stamped clock), :mod:`.context` (one run),
:mod:`.services` (the brokers it runs on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.options import Options

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.config import Config

__all__ = ["Options", "run"]


async def run(
    cfg: Config,
    options: Options,
    *,
    config_path: str | None = None,
    out: Path | None = None,
    summary: Path | None = None,
    chart: Path | None = None,
    profile_dir: Path | None = None,
) -> int:
    """Run the bench (:func:`.runner.run`); imported on use, so ``--help`` stays fast."""
    from benchmarks.runner import run as run_bench  # noqa: PLC0415

    return await run_bench(
        cfg,
        options,
        config_path=config_path,
        out=out,
        summary=summary,
        chart=chart,
        profile_dir=profile_dir,
    )
