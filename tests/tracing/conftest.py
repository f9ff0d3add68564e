"""A real Jaeger v2 for the ``jaeger`` tests: the binary of ``deploy/local/jaeger.sh``,
every listener on 127.0.0.1 on a free port, spans in memory; stopped after the test."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
VERSION = "v1.75.0"

CONFIG = """\
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


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
    ports = {"query": free_port(), "query_grpc": free_port(), "otlp": free_port()}
    config = tmp_path / "jaeger.yaml"
    config.write_text(CONFIG.format(**ports), encoding="utf-8")
    log = (tmp_path / "jaeger.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(jaeger_binary()), "--config", str(config), stdout=log, stderr=subprocess.STDOUT
    )
    api = f"http://127.0.0.1:{ports['query']}"
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
        yield Jaeger(otlp=f"http://127.0.0.1:{ports['otlp']}", api=api)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
