# The two commands of the README, and their parts.
.PHONY: install demo test test-latest check monitoring-check test-deploy test-scale services-up services-down

install:
	./deploy/local/install.sh

demo: install
	.venv/bin/pipeline demo

check: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

test: check monitoring-check
	.venv/bin/pipeline schemas export --check
	.venv/bin/pytest

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

# A longer scale-out run than the default suite's: 50,000 children, three rounds of churn.
test-scale: install
	PIPELINE_SCALE_EVENTS=12500 PIPELINE_SCALE_ROUNDS=3 .venv/bin/pytest -s -p no:cacheprovider tests/stages/test_scale.py

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

services-up: install
	./deploy/local/services.sh up

services-down:
	./deploy/local/services.sh down
