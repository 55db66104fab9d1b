VENV ?= .venv
export LOWBIT_VENV := $(VENV)

.PHONY: setup demo test test-all

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/lowbit demo

test: setup
	$(VENV)/bin/python -m pytest -m "not slow" -q

test-all: setup
	$(VENV)/bin/python -m pytest -q
