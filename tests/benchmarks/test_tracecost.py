"""`python -m benchmarks --tracing`: the code it measures as "before tracing"."""

from __future__ import annotations

import subprocess

from benchmarks import tracecost


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tracecost._ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_the_default_baseline_is_the_code_just_before_the_tracing_merge():
    ref = tracecost.default_ref()
    merge = ref.removesuffix("^1")
    assert _git("rev-parse", f"{merge}^2")  # a merge
    before = _git("ls-tree", "-r", "--name-only", ref, "pipeline/ops/")
    after = _git("ls-tree", "-r", "--name-only", merge, "pipeline/ops/")
    assert "pipeline/ops/tracing.py" not in before.splitlines()
    assert "pipeline/ops/tracing.py" in after.splitlines()
