"""Shared pytest fixtures and hooks (plain helpers are in ``helpers.py``).

Fixtures are grouped by the area they serve; add new groups below the existing ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

from flowpin.signing import init_key


def _pin_cpu_kernels() -> None:
    """Run this pytest process under the reference flow's CPU kernel pins (``hydra.job.env_set`` in
    ``params/common/hydra.yaml``), set before anything imports torch: MKL and ATen read them once, at their
    first use, so a stage run in-process computes with the kernels a ``dvc repro`` subprocess uses. The imports
    above load no torch (nor must any added there)."""
    hydra_yaml = os.path.join(os.path.dirname(os.path.dirname(__file__)), "params", "common", "hydra.yaml")
    with open(hydra_yaml, encoding="utf-8") as f:
        pins = yaml.safe_load(f)["job"]["env_set"]
    for name, value in pins.items():
        os.environ.setdefault(str(name), str(value))


_pin_cpu_kernels()

from helpers import (  # noqa: E402  (after the pins: helpers imports flowpin)
    BIN,
    DATA_STAGES,
    POST_UPSTREAM,
    Project,
    extend_project,
    make_project,
    shared_project,
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A fresh project root (``.dvc/`` marker, Ed25519 key in ``.flowpin/keys``, trusted in ``keys/``)."""
    for var in ("FLOWPIN_ROOT", "FLOWPIN_SIGNING_KEY", "FLOWPIN_DIGEST_ALGORITHM"):
        monkeypatch.delenv(var, raising=False)
    root = (tmp_path / "proj").resolve()
    (root / ".dvc").mkdir(parents=True)
    signer = init_key(root, key_path=root / ".flowpin" / "keys" / "signing.key")
    yield Project(root=root, signer=signer)


# --- torch threads --------------------------------------------------------------------------------


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Two OpenMP threads on this 2-core box cost ~100x on tiny ops; results are the same either way."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- hypothesis profiles (tests/test_fuzz.py) -----------------------------------------------------
# "ci" (default, `make test`): derandomized, so a CI run is reproducible and short. "fuzz" (`make fuzz`,
# nightly): random, enough examples for >= 10,000 cases over tests/test_fuzz.py; the seed is printed by
# `make fuzz` and replayed with FUZZ_SEED=<seed>. Pick one with HYPOTHESIS_PROFILE or --hypothesis-profile.
# Tests that set their own @settings keep them.

settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("fuzz", max_examples=2500, derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- fault injection report (tests/test_faults.py, `make faults`) ---------------------------------


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from helpers import FAULTS

    if FAULTS["injected"]:
        terminalreporter.write_line(f"faults injected: {FAULTS['injected']}, artifacts lost: {FAULTS['lost']}")


# --- tiny flows shared by the session (tests/data/, tests/replay/, tests/post/, test_train_stage.py, ...) --------
# Scratch projects (helpers.make_project) that have run stages of the reference flow, each built once per session:
# under pytest-xdist the first worker that needs one builds it (a file lock; helpers.shared_project) and the others
# wait and reuse it. Each builds on a copy of the one it names. They are READ-ONLY: a test or module fixture takes
# a private copy (helpers.copy_project) before it runs anything there -- dvc, a stage, even `flowpin verify`,
# which writes its stat cache into the project -- or changes a file; only reading files in place is allowed.


@pytest.fixture(scope="session")
def shared_flows_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the shared flows are built: the session's base temporary directory, common to every xdist worker
    (each worker's own basetemp is a subdirectory of it), or this process's own when it runs alone."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp("shared-flows")
    base = tmp_path_factory.getbasetemp().parent / "shared-flows"
    base.mkdir(exist_ok=True)
    return base


@pytest.fixture(scope="session")
def bare_flow(shared_flows_dir: Path) -> Path:
    """``make_project``: the flow's files, a git repository (no commit), DVC, a signing key; nothing run."""
    return shared_project(shared_flows_dir, "bare", make_project)


@pytest.fixture(scope="session")
def ingest_flow(shared_flows_dir: Path, bare_flow: Path) -> Path:
    """``bare_flow`` after ``dvc repro ingest``."""
    return shared_project(shared_flows_dir, "ingest", extend_project(bare_flow, [str(BIN / "dvc"), "repro", "ingest"]))


@pytest.fixture(scope="session")
def data_flow(shared_flows_dir: Path, ingest_flow: Path) -> Path:
    """``ingest_flow`` after ``dvc repro`` of every data stage (helpers.DATA_STAGES), reference recipes."""
    repro = [str(BIN / "dvc"), "repro", *DATA_STAGES]
    return shared_project(shared_flows_dir, "data", extend_project(ingest_flow, repro))


@pytest.fixture(scope="session")
def synth_flow(shared_flows_dir: Path, bare_flow: Path) -> Path:
    """``bare_flow`` with its files committed to git ("flow"), then ``dvc repro synth`` (not committed)."""
    commands = (["git", "add", "-A"], ["git", "commit", "-qm", "flow"], [str(BIN / "dvc"), "repro", "synth"])
    return shared_project(shared_flows_dir, "synth", extend_project(bare_flow, *commands))


@pytest.fixture(scope="session")
def post_flow(shared_flows_dir: Path, bare_flow: Path) -> Path:
    """``bare_flow`` after helpers.POST_UPSTREAM: a small synth, a tokenizer of its tasks, a 4-step pretrain."""
    commands = [[sys.executable, script, *overrides] for script, overrides in POST_UPSTREAM.items()]
    return shared_project(shared_flows_dir, "post", extend_project(bare_flow, *commands))
