"""Megatron's import warnings on the CPU reference path: filtered by exact message and module, said in one line.

A training stage used to print six megatron warnings (a dozen lines) about Transformer Engine and Apex being
absent, and three INFO log lines of megatron's FSDP package, before anything of its own (issue #19). The
subprocess test logs at INFO as Hydra does, imports what the training stages import, initialises the process
group and builds a model as a stage does, then issues warnings and log lines that differ from the filtered ones
by one thing each: none of megatron's own shows, each near miss does, and the line that stands for them is
printed once.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest

from flowpin.train.cpu_warnings import (
    EXPECTED_CPU_WARNINGS,
    EXPECTED_IMPORT_LOGS,
    filter_expected_warnings,
    reference_path_line,
)
from helpers import REPO

TRAINING_STAGES = ("train", "sft", "dpo", "rlvr", "eval")
"""The stage scripts that train or evaluate the megatron model (each calls init_distributed)."""

NEAR_MISSES = (
    ("an unexpected warning", "megatron.core.optimizer"),  # another message from a filtered module
    ("Apex is not installed. Falling back to Torch Norm, and more", "megatron.core.models.backends"),  # longer
    ("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends_v2"),  # another module
    ("Apex is not installed. Falling back to Torch Norm", "megatron.core"),  # a package above the module
)
"""(message, module) pairs close to a filtered warning that must still show."""

_FSDP = "megatron.core.distributed.fsdp.src.megatron_fsdp"
LOG_NEAR_MISSES = (
    (f"{_FSDP}.mixed_precision", "Using Megatron-FSDP without Transformer Engine. And more."),  # longer
    (f"{_FSDP}.mixed_precision", "Detected Megatron Core, using Megatron-FSDP with Megatron."),  # another logger's
    (f"{_FSDP}.mixed_precision.sub", "Using Megatron-FSDP without Transformer Engine."),  # a child logger
)
"""(logger, message) pairs close to a dropped log line that must still show."""

PROBE = f"""
import logging, runpy, sys, warnings
logging.basicConfig(level=logging.INFO, format="LOG %(name)s: %(message)s")  # as Hydra's job logging: INFO
for stage in {TRAINING_STAGES!r}:
    runpy.run_path(f"stages/{{stage}}.py", run_name="probe")  # the stage's imports, as `python stages/x.py`
from flowpin.train.distributed import destroy, init_distributed
from flowpin.train.transformer import ModelConfig, build_model

for _ in range(2):  # a second initialisation in the same process says nothing again
    init_distributed()
    build_model(ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                            num_query_groups=1, vocab_size=64, max_sequence_length=16), device="cpu", seed=0)
    destroy()
from flowpin.train.cpu_warnings import EXPECTED_CPU_WARNINGS
print("NOT IMPORTED", sorted({{w.module for w in EXPECTED_CPU_WARNINGS}} - set(sys.modules)))
for message, module in {NEAR_MISSES!r}:
    warnings.warn_explicit(message, UserWarning, "near_miss.py", 1, module=module)
for name, message in {LOG_NEAR_MISSES!r}:
    logging.getLogger(name).info(message)
"""


def test_training_imports_show_no_expected_warning_but_every_near_miss_and_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "NOT IMPORTED []" in proc.stdout  # every module whose warning is filtered really was imported
    third_party = [ln for ln in proc.stderr.splitlines() if re.search(r"/megatron/\S+\.py:\d+: \w*Warning: ", ln)]
    assert third_party == []  # megatron's own warnings: none shows
    shown = re.findall(r"^near_miss\.py:1: UserWarning: (.*)$", proc.stderr, re.M)
    assert shown == [message for message, _ in NEAR_MISSES]
    logged = [tuple(ln[4:].split(": ", 1)) for ln in proc.stderr.splitlines() if ln.startswith(f"LOG {_FSDP}")]
    assert logged == list(LOG_NEAR_MISSES)  # megatron's own three lines: dropped
    assert any(ln.startswith("LOG ") for ln in proc.stderr.splitlines())  # INFO logging really was on
    import torch

    line = reference_path_line(cuda=torch.cuda.is_available())
    if line is not None:  # no TE, no Apex: the CPU reference path, said once
        assert proc.stderr.splitlines().count(line) == 1
        assert line.startswith("flowpin: CPU reference path: no Transformer Engine, no Apex")
    else:
        assert "no Transformer Engine, no Apex" not in proc.stderr


@pytest.fixture
def filters() -> Iterator[list[warnings.WarningMessage]]:
    """The process's warning filters, restored afterwards (this test module installs its own)."""
    with warnings.catch_warnings(record=True) as log:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        yield log


def test_filters_match_the_whole_message_and_the_whole_module(
    filters: list[warnings.WarningMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "warnoptions", [])
    assert filter_expected_warnings() is True
    for w in EXPECTED_CPU_WARNINGS:
        warnings.warn_explicit(w.message, w.category, "expected.py", 1, module=w.module)
    assert filters == []
    for message, module in NEAR_MISSES:
        warnings.warn_explicit(message, UserWarning, "near_miss.py", 1, module=module)
    warnings.warn_explicit(
        EXPECTED_CPU_WARNINGS[0].message, RuntimeWarning, "x.py", 1, module=EXPECTED_CPU_WARNINGS[0].module
    )
    assert [str(w.message) for w in filters] == [m for m, _ in NEAR_MISSES] + [EXPECTED_CPU_WARNINGS[0].message]


def test_filters_are_installed_once_and_warning_options_win(
    filters: list[warnings.WarningMessage], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "warnoptions", [])
    before = len(warnings.filters)
    filter_expected_warnings()
    filter_expected_warnings()
    assert len(warnings.filters) == before + len(EXPECTED_CPU_WARNINGS)
    for name, message in EXPECTED_IMPORT_LOGS:
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1  # installed when flowpin.train was imported, not again since
        record = logger.makeRecord(name, logging.INFO, "x.py", 1, message, (), None)
        assert not logger.filter(record)
        assert logger.filter(logger.makeRecord(name, logging.INFO, "x.py", 1, message + " ", (), None))
    monkeypatch.setattr(sys, "warnoptions", ["default"])  # python -W default / PYTHONWARNINGS
    warnings.resetwarnings()
    assert filter_expected_warnings() is False
    assert warnings.filters == []


def test_the_line_is_printed_only_without_transformer_engine_and_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    import flowpin.environment

    monkeypatch.setattr(flowpin.environment, "probe_transformer_engine", lambda: {"importable": False})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # no Apex
    cpu = reference_path_line(cuda=False)
    assert cpu is not None and cpu.startswith("flowpin: CPU reference path: no Transformer Engine, no Apex")
    gpu = reference_path_line(cuda=True)
    assert gpu is not None and "CPU reference path" not in gpu and "no Transformer Engine, no Apex" in gpu
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # Apex installed
    assert reference_path_line(cuda=False) is None
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr(flowpin.environment, "probe_transformer_engine", lambda: {"importable": True})
    assert reference_path_line(cuda=True) is None
