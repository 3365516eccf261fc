"""Benchmarks run (figures are not asserted: these machines are noisy); the GPU one refuses here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script(*args: str, cwd: Path = REPO, timeout: int) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script with this interpreter, output captured."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout
    )


def test_h100_benchmark_dry_run_builds_configs_and_refuses_fp8_without_te() -> None:
    proc = _script("benchmarks/h100_throughput.py", "--dry-run", "--models", "olmo3_1b", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "olmo3_1b" in proc.stdout and "FLOPs/token" in proc.stdout
    assert "FP8 refused" in proc.stdout  # no Transformer Engine here: never claim FP8


def test_h100_benchmark_without_cuda_measures_nothing() -> None:
    proc = _script("benchmarks/h100_throughput.py", "--models", "olmo3_1b", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: nothing measured" in proc.stdout + proc.stderr


def test_make_bench_runner_prints_one_table_of_ratios() -> None:
    """`benchmarks/run_all.py` (what `make bench` runs) gathers each script's figures into one table."""
    proc = _script("benchmarks/run_all.py", "--quick", "--only", "checkpoint", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "save_checkpoint" in proc.stdout and "load_checkpoint" in proc.stdout  # the script's own output
    table = proc.stdout[proc.stdout.index("=== every benchmark, one table") :]
    rows = [line for line in table.splitlines() if line.startswith("| checkpoint")]
    assert len(rows) == 2, table
    assert "raw write + fsync" in rows[0] and "raw read + sha256" in rows[1]
    for row in rows:
        ratio = float(row.split("|")[5].strip().removesuffix("x"))
        assert ratio > 0


def test_make_bench_runner_refuses_an_unknown_benchmark() -> None:
    proc = _script("benchmarks/run_all.py", "--only", "nope", timeout=60)
    assert proc.returncode == 2 and "unknown benchmark(s) nope" in proc.stderr


def test_hashing_benchmark_runs_in_a_fresh_clone_without_a_flowpin_directory(tmp_path: Path) -> None:
    """`make bench` on a fresh clone runs hashing before anything has created `.flowpin/` (a key, data-full)."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "benchmarks", clone / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    proc = _script("benchmarks/run_all.py", "--quick", "--only", "hashing", cwd=clone, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout[proc.stdout.index("=== every benchmark, one table") :]
    assert any(line.startswith("| hashing") and "hashlib" in line for line in table.splitlines()), table
    assert (clone / ".flowpin").is_dir() and not list((clone / ".flowpin").iterdir())  # scratch removed
