"""The package's layering is a checked contract: a forbidden import breaks `lint-imports`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports with the project's contracts over the copies in ``tree``."""
    env = os.environ | {"PYTHONPATH": str(tree)}  # the copies shadow the checkout's
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in ("pipeline", "benchmarks"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


def test_the_package_keeps_its_contracts(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("core/decode.py", "from pipeline.io import kafka", "core is pure"),
        ("core/mapping.py", "import aiohttp", "core is pure"),
        ("stages/router.py", "from pipeline.tools import status", "layers"),
        (
            "stages/sink/worker.py",
            "from pipeline.dps.emulator import start_emulator",
            "only the tools",
        ),
        ("io/kafka/admin.py", "from pipeline.stages import ingest", "layers"),
        ("stages/router.py", "from pipeline.io import _aiokafka_internals", "libraries are"),
        ("tools/demo.py", "from benchmarks import report", "the package never imports"),
    ],
)
def test_a_forbidden_import_breaks_the_check(
    tree: Path, module: str, line: str, contract: str
) -> None:
    path = tree / "pipeline" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # noqa\n", encoding="utf-8")
    result = lint(tree)
    assert result.returncode == 1, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert [row for row in broken if row.startswith(contract)], result.stdout
