# Common tasks; every target uses the project's venv (make setup, or the README's set-up command).
VENV ?= .venv
PY := $(VENV)/bin/python
NICE ?= nice -n 5

.PHONY: setup test-fast test test-system lint format typecheck imports check bench

setup:  ## venv with the runtime, training and dev tools
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -q -e '.[train,dev]'

test-fast:  ## pure functions, models, files: no Ray, no subprocess (< 30 s)
	$(NICE) $(PY) -m pytest -q -m fast

test-system:  ## real Ray/Serve, ZeroMQ, processes, Ansible, training runs, fault drills (~8 min on 2 cores)
	$(NICE) $(PY) -m pytest -q -m system

test:  ## both tiers (the README's test command)
	$(NICE) $(PY) -m pytest -q

lint:  ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:  ## apply ruff's fixes and format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck:  ## mypy on appliance/ (config in pyproject.toml)
	$(VENV)/bin/mypy

imports:  ## import-linter contracts in pyproject.toml (runtime never imports models, bench, tools)
	$(VENV)/bin/lint-imports

check: lint typecheck imports test-fast  ## what pre-commit and CI run before the full suite

bench:  ## end-to-end throughput on this machine (bench/replay.py; JSON in bench/results/)
	$(NICE) $(PY) bench/replay.py --local --tiles 300
