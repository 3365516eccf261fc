"""Shared pytest fixtures and hooks (plain helpers are in ``helpers.py``).

Fixtures are grouped by the area they serve; add new groups below the existing ones.
"""

from __future__ import annotations

import os
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

from helpers import Project  # noqa: E402  (after the pins: helpers imports flowpin)


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
