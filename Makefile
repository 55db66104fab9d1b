VENV ?= .venv
export LOWBIT_VENV := $(VENV)

.PHONY: setup demo lint test

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/lowbit demo

lint: setup
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m ruff format --check .

# Every test, slow ones included; tests marked gpu skip where there is no CUDA device.
test: setup
	$(VENV)/bin/python -m pytest -q
