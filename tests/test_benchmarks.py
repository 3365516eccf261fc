"""Benchmarks run (figures are not asserted: these machines are noisy); the GPU one refuses here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_h100_benchmark_dry_run_builds_configs_and_refuses_fp8_without_te() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/h100_throughput.py", "--dry-run", "--models", "olmo3_1b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "olmo3_1b" in proc.stdout and "FLOPs/token" in proc.stdout
    assert "FP8 refused" in proc.stdout  # no Transformer Engine here: never claim FP8


def test_h100_benchmark_without_cuda_measures_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/h100_throughput.py", "--models", "olmo3_1b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: nothing measured" in proc.stdout + proc.stderr


def test_checkpoint_benchmark_prints_both_ratios() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/checkpoint.py", "--repeat", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "save_checkpoint" in proc.stdout and "load_checkpoint" in proc.stdout and "x\n" in proc.stdout
