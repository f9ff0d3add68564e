# The two commands of the README, and their parts.
.PHONY: install demo test test-uvloop test-long test-tracing test-latest check monitoring-check test-deploy bench services-up services-down

install:
	./deploy/local/install.sh

demo: install
	.venv/bin/pipeline demo

check: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

# Tests run side by side in WORKERS processes (pytest-xdist), each on a Mosquitto of its
# own and the run's one Kafka (tests/conftest.py); most of a test's time is waiting.
WORKERS ?= 4

test: check monitoring-check
	.venv/bin/pipeline schemas export --check
	.venv/bin/pytest -n $(WORKERS) --dist worksteal -m "not long and not jaeger"

# The in-process tests of what runs on uvloop in a deployment (`[runtime] event_loop =
# "auto"`: the router, the sink, the DPS client and its HTTP pool, the Kafka edge, the ops
# server) on uvloop instead of asyncio's loop (tests/conftest.py). Ingest's tests stay
# out: ingest runs on asyncio's loop. CI runs it after make test.
UVLOOP_TESTS = tests/io/test_aio.py tests/io/test_http.py tests/io/test_kafka.py \
	tests/io/test_kafka_security.py tests/io/test_wait.py tests/dps tests/stages/sink \
	tests/stages/test_router_lifecycle.py tests/stages/test_faults.py \
	tests/stages/test_sync_requests.py tests/ops
test-uvloop: install
	PIPELINE_TEST_EVENT_LOOP=uvloop .venv/bin/pytest -n $(WORKERS) --dist worksteal \
		-m "not long and not jaeger" $(UVLOOP_TESTS)

# What `make test` checks on less, at full size and in real time: rates under partial
# DPS failure, the 50,000-child scale-out (PIPELINE_SCALE_EVENTS, PIPELINE_SCALE_ROUNDS).
# CI runs it when the budget allows (.ci/run).
test-long: install
	.venv/bin/pytest -p no:xdist -m long -s

# The traces in a real Jaeger v2 (built once from the Go module proxy into the cache by
# deploy/local/jaeger.sh, ~8 min the first time): the tests marked `jaeger`, against a
# Jaeger they start on free ports (deploy/local/jaeger.yaml). CI runs it after make test.
test-tracing: install
	./deploy/local/jaeger.sh
	.venv/bin/pytest -p no:xdist -m jaeger

# The newest versions pyproject.toml allows instead of the locked ones, in a virtualenv of
# their own: a release within our bounds that breaks us fails here before a lock update.
# Only what needs no broker ("not services" also keeps tests/conftest.py from starting one).
test-latest:
	[ -x .venv-latest/bin/python ] || python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/pip list --format=freeze | grep -iE '^(msgspec|orjson|rich|aiohttp|aiokafka|aiomqtt|paho-mqtt|pytest|hypothesis)=='
	.venv-latest/bin/pipeline schemas export --check
	.venv-latest/bin/pytest -p no:xdist -m "not services" -q

# deploy/monitoring: the rules load, and their unit tests (every alert fires when it
# should and stays quiet when it should not) pass; the Kubernetes copies are current.
monitoring-check: install
	promtool check config deploy/monitoring/prometheus.yml
	promtool test rules deploy/monitoring/*.test.yml
	.venv/bin/python deploy/monitoring/generate.py --check

# The container path for real: Docker (installed/started if need be), Compose v2, the
# images, the compose stack on ports 2xxxx, the demo through it, SIGTERM, exit codes.
# Not part of `make test` (minutes, and needs root for apt and dockerd): .ci/run runs it.
test-deploy: install
	./deploy/compose/test-deploy.sh

# benchmarks/ (not in the wheel or the image): each stage against its raw ceiling, latency
# against load, memory, at the default sizes on the configured brokers, started from
# deploy/local if down (2 min 36 s on a quiet machine with a Mosquitto saving every second,
# 21 min on a loaded one with deploy/local's, which saves after every change: see
# docs/measured.md). Writes benchmarks/results/summary.json and bench.png (tracked) and
# every figure to benchmarks/results/raw/ (untracked); `python -m benchmarks --help` for more.
bench: install
	.venv/bin/python -m benchmarks

services-up: install
	./deploy/local/services.sh up

services-down:
	./deploy/local/services.sh down
