"""What `make test-deploy` asserts about the compose stack after the demo replay.

Reads the stack's Kafka from the host (the EXTERNAL listener) and each worker's
operator endpoints through their host ports:

    python deploy/compose/verify.py demo --bootstrap 127.0.0.1:29092
    python deploy/compose/verify.py endpoints --ports 29101,29102,29103
    python deploy/compose/verify.py trace --jaeger http://127.0.0.1:26686 --sn inverter-a-02

``demo``: waits (up to --wait s) until the topics hold what the bundled demo must give,
then checks it exactly: every valid child allocated, the ingest DLQ with its reason, the
two DPS DLQ reasons (35404 group missing, 35601 sn unknown) and the children IoTDA failed
to add. ``endpoints``: /readyz 200 with every check true, /healthz 200, and the /metrics
counters that show the demo went through. ``trace`` (profile "tracing",
``TEST_DEPLOY_TRACING=1``): Jaeger's query API holds exactly one trace with a span tagged
``dps.sn`` = the sn, and that trace has spans of ingest, the router and the sink (told by
service or span name) and the DPS call (an HTTP client span). Exit status 0 when all
hold; one line per failed expectation otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

from pipeline.config import KafkaConfig
from pipeline.io import kafka

# The bundled demo (pipeline/tools/data/demo.jsonl with the emulator's --demo devices).
ADDED = 21  # unique children IoTDA added: 20 by responses (the redelivered event yields
# nothing new), 1 by an add_sub_device_notify
FAILED = 5  # children IoTDA failed to add
INGEST_DLQ = 1  # the malformed message
DPS_DLQ = {35404: 1, 35601: 1}  # group missing, sn unknown
ALLOCATED = ADDED - sum(DPS_DLQ.values())
OK = 200


async def _read(cfg: KafkaConfig, topic: str) -> list[Any]:
    async with kafka.reader(cfg) as reader:
        ranges = await kafka.whole(reader, topic)
        return [record async for record in kafka.read_range(reader, ranges)]


async def demo(bootstrap: str, wait: float) -> list[str]:
    cfg = KafkaConfig(bootstrap_servers=bootstrap)
    return _check(await _settled(cfg, wait))


async def _settled(cfg: KafkaConfig, wait: float) -> dict[str, list[Any]]:
    t = cfg.topics
    deadline = time.monotonic() + wait
    while True:
        got = {
            name: await _read(cfg, topic)
            for name, topic in (
                ("added", t.added),
                ("failed", t.failed),
                ("ingest_dlq", t.down_events_dlq),
                ("allocated", t.allocations),
                ("dps_dlq", t.allocations_dlq),
            )
        }
        done = len(got["allocated"]) + len(got["dps_dlq"]) >= ADDED
        if done or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(2.0)  # anything extra would arrive now, and fail the exact counts
    got["allocated"] = await _read(cfg, t.allocations)
    got["dps_dlq"] = await _read(cfg, t.allocations_dlq)
    return got


def _check(got: dict[str, list[Any]]) -> list[str]:
    problems = []
    for name, expected in (
        ("added", ADDED),
        ("failed", FAILED),
        ("ingest_dlq", INGEST_DLQ),
        ("allocated", ALLOCATED),
    ):
        if len(got[name]) != expected:
            problems.append(f"{name}: {len(got[name])} records, expected {expected}")
    sns = [json.loads(r.value)["sn"] for r in got["allocated"]]
    if len(set(sns)) != len(sns):
        problems.append(f"allocations: an sn allocated twice: {sorted(sns)}")
    codes: dict[int, int] = {}
    for record in got["dps_dlq"]:
        outcome = json.loads(record.value)
        codes[outcome["code"]] = codes.get(outcome["code"], 0) + 1
        kind, code, msg = outcome["error_kind"], outcome["code"], outcome["msg"]
        print(f"  DPS DLQ: sn {outcome['sn']}: {kind} {code} {msg}")
    if codes != DPS_DLQ:
        problems.append(f"dps DLQ codes {codes}, expected {DPS_DLQ}")
    for record in got["ingest_dlq"]:
        reason = dict(record.headers).get("error", b"").decode()
        print(f"  ingest DLQ: {reason}")
        if not reason:
            problems.append("ingest DLQ record without an error header")
    for record in got["failed"]:
        reason = json.loads(record.value)["reason"]
        print(f"  IoTDA failed: {reason['node_id']}: {reason['error_code']} {reason['error_msg']}")
    print(
        f"demo: {len(got['added'])} added, {len(got['allocated'])} allocated, "
        f"{len(got['dps_dlq'])} DPS DLQ, {len(got['failed'])} IoTDA failed, "
        f"{len(got['ingest_dlq'])} ingest DLQ"
    )
    return problems


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310  (http://127.0.0.1)
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def endpoints(ports: dict[str, int]) -> list[str]:
    problems = []
    expected_metrics = {
        "ingest": ['pipeline_ingest_messages_total{outcome="landed"}', "pipeline_mqtt_connected 1"],
        "route": ['pipeline_router_transactions_total{outcome="committed"}'],
        "sink": [f'pipeline_sink_outcomes_total{{outcome="allocated"}} {ALLOCATED}.0'],
    }
    for stage, port in ports.items():
        base = f"http://127.0.0.1:{port}"
        status, body = _get(f"{base}/readyz")
        print(f"  {stage} /readyz: {status} {body}")
        if status != OK or not all(json.loads(body)["checks"].values()):
            problems.append(f"{stage}: /readyz {status} {body}")
        status, body = _get(f"{base}/healthz")
        if status != OK:
            problems.append(f"{stage}: /healthz {status} {body}")
        status, body = _get(f"{base}/metrics")
        problems += [
            f"{stage}: /metrics lacks {n}" for n in expected_metrics[stage] if n not in body
        ]
    return problems


STAGES = ("ingest", "route", "sink")  # in a service or span name: "route" also in "router"


def _jaeger(base: str, path: str, **query: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    status, body = _get(url)
    if status != OK:
        msg = f"GET {url}: {status} {body[:200]}"
        raise RuntimeError(msg)
    return json.loads(body)["data"]


def _traces_of(base: str, sn: str) -> dict[str, Any]:
    """Every trace (by id) with a span tagged ``dps.sn`` = sn, searched in every service."""
    found: dict[str, Any] = {}
    for service in _jaeger(base, "/api/services") or []:
        tags = json.dumps({"dps.sn": sn})
        for trace in _jaeger(base, "/api/traces", service=service, tags=tags, lookback="2h"):
            found[trace["traceID"]] = trace
    return found


def _span_tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span.get("tags", [])}


def trace(base: str, sn: str, wait: float) -> list[str]:
    deadline = time.monotonic() + wait
    while True:  # the workers export in batches: the last spans may come a few seconds late
        names, problems = _check_trace(base, sn, _traces_of(base, sn))
        if not problems or time.monotonic() > deadline:
            print(f"  trace of {sn}: {len(names)} spans")
            for name in sorted(names):
                print(f"    {name}")
            return problems
        time.sleep(2.0)


def _check_trace(base: str, sn: str, traces: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The trace's spans as "service operation", and what it lacks."""
    if len(traces) != 1:
        return [], [
            f"{len(traces)} traces with a span tagged dps.sn={sn}, expected 1: {sorted(traces)}"
        ]
    (trace_id,) = traces
    whole = _jaeger(base, f"/api/traces/{trace_id}")[0]
    processes = whole["processes"]
    names = [
        f"{processes[span['processID']]['serviceName']} {span['operationName']}"
        for span in whole["spans"]
    ]
    problems = [
        f"trace {trace_id}: no span of {stage}"
        for stage in STAGES
        if not any(stage in name.lower() for name in names)
    ]
    tags = [_span_tags(span) for span in whole["spans"]]
    if not any(t.get("span.kind") == "client" and "http.request.method" in t for t in tags):
        problems.append(f"trace {trace_id}: no HTTP client span (the DPS call)")
    return names, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("demo")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--wait", type=float, default=120.0)
    p = sub.add_parser("endpoints")
    p.add_argument("--ports", required=True, help="ingest,route,sink metrics host ports")
    p = sub.add_parser("trace")
    p.add_argument("--jaeger", required=True, help="Jaeger's query base URL")
    p.add_argument("--sn", default="inverter-a-02")
    p.add_argument("--wait", type=float, default=30.0)
    args = parser.parse_args()
    if args.what == "demo":
        problems = asyncio.run(demo(args.bootstrap, args.wait))
    elif args.what == "trace":
        problems = trace(args.jaeger.rstrip("/"), args.sn, args.wait)
    else:
        ports = dict(zip(("ingest", "route", "sink"), map(int, args.ports.split(",")), strict=True))
        problems = endpoints(ports)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
