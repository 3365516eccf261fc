"""Run every CPU benchmark and print their headline figures as one table (``make bench``).

    python benchmarks/run_all.py [--only hashing,checkpoint] [--quick] [--out reports/bench.md]

Each script runs in its own process (its own threads, page cache warm-up, torch state), prints its
detailed figures as it goes, and hands its headline figures back as JSON; the table at the end holds
them all, each a ratio against a baseline measured in the same run (see ``benchmarks/figures.py``).
``--quick`` shrinks every benchmark (fewer repeats, smaller data) for a smoke run: its figures are
noisier, not comparable with a full run's. The GPU benchmark (``h100_throughput.py``) is not part of it:
it needs an H100 and prints its own table there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figures import Figure, read_figures, table

HERE = Path(__file__).resolve().parent

BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    # name: (full-run arguments, --quick arguments)
    "hashing": ([], ["--big-mib", "64", "--files", "1000", "--repeat", "1"]),
    "data": ([], []),
    "checkpoint": ([], ["--repeat", "1"]),
    "tracking": ([], ["--steps", "5", "--repeat", "3", "--warmup", "1"]),
    "cpu_isa": (["--repeat", "2"], ["--steps", "3"]),
    "parallel": ([], ["--steps", "1"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS)
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: smaller data, fewer repeats")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    figures: list[Figure] = []
    failed: list[str] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="flowpin-bench-") as tmp:
        for name in names:
            full, quick = BENCHMARKS[name]
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full), "--figures", str(out)]
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, check=False)
            seconds[name] = time.perf_counter() - start
            if proc.returncode != 0 or not out.exists():
                failed.append(f"{name} (exit {proc.returncode})")
                continue
            figures += read_figures(out)

    text = table(figures)
    took = ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
    print(f"\n=== every benchmark, one table{' (--quick: smoke figures)' if args.quick else ''} ({took})")
    print("time ratio = flowpin's seconds / the baseline's seconds for the same work, in the same run\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
