# The two commands of the README, and their parts.
.PHONY: install demo test check services-up services-down

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

services-up: install
	./deploy/local/services.sh up

services-down:
	./deploy/local/services.sh down
