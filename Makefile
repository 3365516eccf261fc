# flowpin — the two commands of the README, plus helpers.
#   make run   create .venv if missing, install, replay the reference flow (dvc repro), verify manifests
#   make test  create .venv if missing, install, run ruff, mypy and pytest
#   make shell an interactive shell inside the environment (what `source .venv/bin/activate` gives)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PATH := $(BIN):$(PATH)

.PHONY: install run shell test lint typecheck pytest bench fuzz faults data-full release-check release-record clean-venv

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
	$(BIN)/flowpin verify manifests/*.json  # the reference flow (variants live in manifests/full/)

# A new interactive shell inside the environment: .venv/bin first on PATH and VIRTUAL_ENV set (the venv's
# activate script), so that `dvc repro` (whose stages run `python stages/<x>.py`), `flowpin`, `python` and
# `torchrun` are the environment's. `exit` leaves it. In the current shell: `source .venv/bin/activate`.
shell: install
	@echo "flowpin: a shell inside $(abspath $(VENV)) (exit to leave)"
	@. $(VENV)/bin/activate && exec $${SHELL:-bash} -i

# The full-flow reproducibility check (after `make run`, e.g. on a fresh clone): every manifest of the
# release record (manifests/*.json; on a fresh clone that is what `verify --all` finds, as the variants
# in manifests/full/ are gitignored) verifies (signature, trusted key, every digest), and every stage,
# re-run in a scratch workspace from exactly what its manifest pins, reproduces every output digest bit
# for bit. Fails when a manifest does not verify (1), a rebuild differs (1) or cannot run (2: missing
# input, code drift, failing stage).
release-check: install
	# --no-cache: every byte is read; the stat cache is a local speed-up, never evidence (docs/hardening.md)
	$(BIN)/flowpin verify --no-cache manifests/*.json
	$(BIN)/flowpin rebuild --all
	# dvc.lock pins every output's content: unchanged after `make run` = the committed digests, bit for bit
	git diff --exit-code --stat -- dvc.lock

# Regenerate the release record (dvc.lock, manifests/, reports/) from a clean commit: a record made from a
# dirty tree names code nobody can check out. Refuses uncommitted changes (the record's own files excepted).
release-record: install
	@test -z "$$(git status --porcelain --untracked-files=all -- . ':(exclude)manifests' ':(exclude)reports' \
	  ':(exclude)dvc.lock' ':(exclude)keys')" || { echo "make release-record: uncommitted changes (see git \
	status); a release record comes from a clean commit: commit or stash them first" >&2; exit 2; }
	$(BIN)/flowpin key init --if-missing
	$(BIN)/dvc repro
	$(BIN)/flowpin verify --no-cache manifests/*.json

# The data stages on the whole standard library (params/*_full.yaml), outside DVC's reference flow:
# writes data/full/, reports/full/, manifests/full/ (gitignored). synth is shared with the reference.
data-full: install
	$(BIN)/flowpin key init --if-missing
	$(BIN)/dvc repro synth
	$(BIN)/python stages/ingest.py --config-name ingest_full
	$(BIN)/python stages/dedup.py --config-name dedup_full
	$(BIN)/python stages/decontaminate.py --config-name decontaminate_full
	$(BIN)/python stages/mix.py --config-name mix_full
	$(BIN)/python stages/tokenize_corpus.py --config-name tokenize_full
	$(BIN)/flowpin verify manifests/full/*.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Two workers (CI has 2 cores), each test file on one worker: module-scoped flows are built once, and the
# fuzz tally (a module fixture in tests/test_fuzz.py) sees every case of its file. Measured: pytest 14.0 min (1657 tests), make test 14.5 min, on 2 cores (issue 15, shared session flows); 27 min serially before xdist.
PYTEST_WORKERS ?= 2
pytest: install
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: lint typecheck pytest

# Every CPU benchmark (hashing + warm verify, data stages, checkpoint, tracking), each beside its baseline
# from the same run, then one table of their ratios (also written to reports/bench.md, gitignored).
bench: install
	$(BIN)/python benchmarks/run_all.py --out reports/bench.md

# Nightly-style fuzzing (tests/test_fuzz.py, hypothesis profile "fuzz"): >= 10,000 cases of arbitrary and
# mutated manifests, envelopes, canonical JSON, state.json and shards; any exception other than a
# FlowpinError fails it. Prints "fuzz: N cases, M crashes". Replay a run with FUZZ_SEED=<the printed seed>.
ifndef FUZZ_SEED
FUZZ_SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
fuzz: install
	@echo "fuzz: hypothesis seed $(FUZZ_SEED) (replay: make fuzz FUZZ_SEED=$(FUZZ_SEED))"
	$(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz.py --hypothesis-profile=fuzz --hypothesis-seed=$(FUZZ_SEED)

# Fault injection (docs/hardening.md): SIGKILL at every write point, DVC killed mid-commit, a full tmpfs
# and a file size limit; ends with "faults injected: N, artifacts lost: 0". Also part of `make test`.
faults: install
	$(BIN)/pytest -q tests/test_faults.py -rA

clean-venv:
	rm -rf $(VENV)
