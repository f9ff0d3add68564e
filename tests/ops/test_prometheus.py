"""deploy/monitoring against a real Prometheus scraping a real pipeline run.

Debian's Prometheus on a free port scrapes ``pipeline run`` (all three stages) every
second and evaluates deploy/monitoring/pipeline.rules.yml. The demo fixture is driven
through the pipeline (allocations, an ingest DLQ record, two DPS rejections), then
Prometheus's HTTP API must show: every metric the rules and the Grafana dashboard use
exists, the counters moved, every rule evaluates without error, the DLQ alerts fire, and
every dashboard query returns data. A renamed metric fails here, not on the pager.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import load_devices, start_emulator
from pipeline.io import mqtt
from pipeline.tools import demo
from pipeline.tools.replay import replay
from pipeline.tools.services import free_port
from tests import harness
from tests.harness import (
    DEMO_FIXTURE,
    ROOT,
    read_topic,
    terminate,
    wait_readyz,
    worker_env,
)

pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(
        not shutil.which("prometheus"), reason="Debian's prometheus is not installed"
    ),
]

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "pipeline.rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
_METRIC = re.compile(r"\b(pipeline_[a-z_]+|up)\b(?!\s*\()")

# Counters the demo must move, as PromQL selectors (the increase must be > 0).
MOVING = [
    'pipeline_ingest_messages_total{outcome="landed"}',
    'pipeline_ingest_messages_total{outcome="dlq"}',
    'pipeline_router_records_total{outcome="routed"}',
    'pipeline_router_children_total{kind="added"}',
    'pipeline_router_children_total{kind="failed"}',
    'pipeline_router_transactions_total{outcome="committed"}',
    'pipeline_sink_calls_total{result="ok"}',
    'pipeline_sink_calls_total{result="rejected"}',
    'pipeline_sink_outcomes_total{outcome="allocated"}',
    'pipeline_sink_outcomes_total{outcome="rejected"}',
    "pipeline_sink_call_seconds_count",
    "pipeline_stage_last_progress_timestamp_seconds",
]


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression reads (recording rule names excluded)."""
    return {m for m in _METRIC.findall(promql) if not m.startswith("pipeline:")}


def rule_exprs() -> list[str]:
    """Every ``expr`` of the rules file (block scalars included), without YAML parsing."""
    exprs: list[str] = []
    lines = RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        key, _, rest = line.strip().partition(":")
        if key != "expr":
            continue
        if rest.strip() not in ("|", ">"):
            exprs.append(rest.strip())
            continue
        indent = len(line) - len(line.lstrip()) + 2
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) < indent:
                break
            body.append(following.strip())
        exprs.append(" ".join(body))
    return exprs


def dashboard_exprs(rate_interval: str = "1m", range_: str = "5m") -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        t["expr"].replace("$__rate_interval", rate_interval).replace("$__range", range_)
        for p in panels
        for t in p["targets"]
    ]


def test_the_rules_and_dashboard_read_pipeline_metrics() -> None:
    # The static half: the parsers above find what the live test checks.
    assert len(rule_exprs()) == 21
    used = set().union(*map(metric_names, rule_exprs() + dashboard_exprs()))
    assert "pipeline_sink_paused" in used
    assert "up" in used


class Prometheus:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url

    async def query(self, promql: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}/api/v1/query", params={"query": promql}) as r:
            body = await r.json()
        assert body["status"] == "success", (promql, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def get(self, path: str) -> Any:
        async with self.http.get(f"{self.url}{path}") as r:
            body = await r.json()
        assert body["status"] == "success", body
        return body["data"]

    async def until(self, promql: str, limit: float = 60) -> list[dict[str, Any]]:
        """Until ``promql`` returns something (or fail, naming it)."""
        deadline = time.monotonic() + limit
        while not (result := await self.query(promql)):
            assert time.monotonic() < deadline, f"no data for {promql}"
            await asyncio.sleep(0.5)
        return result


async def _start(tmp: Path, port: int, log: Any) -> asyncio.subprocess.Process:
    return await harness.start(
        "prometheus",
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )


@contextlib.asynccontextmanager
async def prometheus(tmp: Path, target: str) -> Any:
    port = free_port()
    config = {  # JSON is YAML: no YAML library needed
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "iot-pipeline",
                "static_configs": [{"targets": [target], "labels": {"component": "run"}}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))
    with (tmp / "prometheus.log").open("w") as log:
        proc = await _start(tmp, port, log)
    url = f"http://127.0.0.1:{port}"

    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                assert proc.returncode is None, (tmp / "prometheus.log").read_text()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/-/ready") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http:
            yield Prometheus(http, url)
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.timeout(240)
async def test_prometheus_scrapes_the_metrics_the_rules_and_dashboard_use(
    cfg: Config, uid: str, tmp_path: Path
) -> None:
    port = free_port()
    with contextlib.ExitStack() as files:
        devices = load_devices(files.enter_context(_as_file(demo.DEMO_DEVICES)))
    async with await start_emulator(devices=devices) as emu:
        cfg = msgspec.structs.replace(
            cfg,
            sink=msgspec.structs.replace(
                cfg.sink,
                dps=msgspec.structs.replace(cfg.sink.dps, base_url=emu.url),
                device_data={"deviceName": "name", "model": "model"},
            ),
        )
        # An edge broker's bridge notification (retained, as Mosquitto publishes it), on a
        # plain topic: clients cannot publish under $SYS.
        bridge_state = f"edge-{uid}/connection/+/state"
        async with mqtt.connect(cfg.mqtt, client_id=f"edge-{uid}", persistent=False) as edge:
            await edge.publish(
                bridge_state.replace("+", f"gw-{uid}_0_0_2026112300"), b"1", qos=1, retain=True
            )
        env = worker_env(
            cfg,
            METRICS__ENABLED="true",
            METRICS__RUN_PORT=str(port),
            MQTT__BRIDGE_STATE=bridge_state,
        )
        proc = await harness.start(
            sys.executable, "-m", "pipeline", "--log-level", "warning", "run",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await wait_readyz(port, proc)
            async with prometheus(tmp_path, f"127.0.0.1:{port}") as prom:
                await prom.until('up{job="iot-pipeline", component="run"} == 1')
                await replay(cfg.mqtt, [DEMO_FIXTURE], progress=False)
                await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=18)
                await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=2)
                await _check(prom)
        finally:
            if proc.returncode is None:
                assert await terminate(proc) == 0


async def _check(prom: Prometheus) -> None:
    # Counters moved (and were scraped after moving).
    for selector in MOVING:
        what = f"max_over_time({selector}[5m]) - min_over_time({selector}[5m])"
        await prom.until(f"sum({what}) > 0")
    await prom.until('pipeline_mqtt_connected{job="iot-pipeline"} == 1')
    await prom.until('pipeline_consumer_lag{stage="route"}')
    await prom.until('pipeline_consumer_lag{stage="sink"}')
    # Every metric the rules and the dashboard read exists in this Prometheus.
    seen = set(await prom.get("/api/v1/label/__name__/values"))
    used = set().union(*map(metric_names, rule_exprs() + dashboard_exprs()))
    # pipeline_audit_* come from `pipeline audit --prometheus` through node-exporter's
    # textfile collector, not from the workers (tests/tools/test_audit.py writes them).
    used = {name for name in used if not name.startswith("pipeline_audit_")}
    assert used <= seen, f"used but never scraped: {sorted(used - seen)}"
    # The DLQ alerts fire (no `for`): the ingest DLQ record and the two DPS rejections.
    deadline = time.monotonic() + 30
    while True:
        alerts = (await prom.get("/api/v1/alerts"))["alerts"]
        firing = {
            (a["labels"]["alertname"], a["labels"].get("component") or a["labels"].get("outcome"))
            for a in alerts
            if a["state"] == "firing"
        }
        wanted = {
            ("PipelineDownEventsDlqGrowing", "run"),
            ("PipelineAllocationsDlqGrowing", "rejected"),
        }
        if wanted <= firing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert wanted <= firing, alerts
    quiet = {"PipelineWorkerDown", "PipelineMqttDisconnected", "PipelineSinkPaused"}
    assert not {name for name, _ in firing} & quiet, firing
    # Every rule evaluates without error.
    groups = (await prom.get("/api/v1/rules"))["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 21
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    # Every dashboard query returns data.
    for expr in dashboard_exprs():
        assert await prom.query(expr), f"dashboard query without data: {expr}"


@contextlib.contextmanager
def _as_file(resource: Any) -> Any:
    import importlib.resources  # noqa: PLC0415

    with importlib.resources.as_file(resource) as path:
        yield str(path)
