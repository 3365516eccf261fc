# flowpin — the two commands of the README, plus helpers.
#   make run   create .venv if missing, install, replay the reference flow (dvc repro), verify manifests
#   make test  create .venv if missing, install, run ruff, mypy and pytest
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PATH := $(BIN):$(PATH)

.PHONY: install run test lint typecheck pytest bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the CPU wheel: otherwise a dependency may pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	$(BIN)/pip check
	touch $@

install: $(STAMP)

run: install
	$(BIN)/flowpin key init --if-missing
	$(BIN)/dvc repro
	$(BIN)/flowpin verify --all

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: install
	$(BIN)/python benchmarks/hashing.py

clean-venv:
	rm -rf $(VENV)
