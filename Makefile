# The two commands of the README, and their parts.
.PHONY: install demo test check test-scale services-up services-down

install:
	./deploy/local/install.sh

demo: install
	.venv/bin/pipeline demo

check: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

test: check
	.venv/bin/pipeline schemas export --check
	.venv/bin/pytest

# A longer scale-out run than the default suite's: 50,000 children, three rounds of churn.
test-scale: install
	PIPELINE_SCALE_EVENTS=12500 PIPELINE_SCALE_ROUNDS=3 .venv/bin/pytest -s -p no:cacheprovider tests/stages/test_scale.py

services-up: install
	./deploy/local/services.sh up

services-down:
	./deploy/local/services.sh down
