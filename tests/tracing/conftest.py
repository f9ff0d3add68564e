"""A real Jaeger v2 for the ``jaeger`` tests: the binary of ``deploy/local/jaeger.sh`` with
the configuration users run, ``deploy/local/jaeger.yaml``, every listener on 127.0.0.1 on
a free port, spans in memory; stopped after the test."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pipeline.tools.services import free_port

ROOT = Path(__file__).resolve().parents[2]
VERSION = "v1.75.0"

CONFIG = ROOT / "deploy" / "local" / "jaeger.yaml"
"""The configuration users run: every listener on ``JAEGER_LISTEN_HOST``, ports from env."""


@dataclasses.dataclass(frozen=True)
class Jaeger:
    """A running Jaeger: where to send spans (OTLP/HTTP) and its query API."""

    otlp: str
    api: str


def jaeger_binary() -> Path:
    """``deploy/local/jaeger.sh --path`` (it builds the binary once, if need be)."""
    script = ROOT / "deploy" / "local" / "jaeger.sh"
    if script.exists():
        found = subprocess.run(
            [str(script), "--path"], check=True, capture_output=True, text=True, timeout=900
        )
        return Path(found.stdout.strip().splitlines()[-1])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    built = cache / "iot-pipeline" / "jaeger" / VERSION / "jaeger"
    if not built.exists():
        pytest.fail(f"no Jaeger binary: {script} is missing and {built} was not built")
    return built


@pytest.fixture
async def jaeger(tmp_path: Path) -> AsyncIterator[Jaeger]:
    names = ("OTLP_GRPC", "OTLP_HTTP", "QUERY", "QUERY_GRPC", "HEALTH")
    ports = {name: free_port() for name in names}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {f"JAEGER_{name}_PORT": str(port) for name, port in ports.items()}
    env["JAEGER_LISTEN_HOST"] = "127.0.0.1"
    log = (tmp_path / "jaeger.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(jaeger_binary()), "--config", str(CONFIG), stdout=log, stderr=subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    api = f"http://127.0.0.1:{ports['QUERY']}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:  # until the query API answers
                if proc.returncode is not None:
                    text = (tmp_path / "jaeger.log").read_text(errors="replace")
                    pytest.fail(f"jaeger exited {proc.returncode}: {text[-2000:]}")
                try:
                    async with http.get(f"{api}/api/services") as answer:
                        if answer.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        yield Jaeger(otlp=f"http://127.0.0.1:{ports['OTLP_HTTP']}", api=api)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
