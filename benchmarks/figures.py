"""The figures every benchmark reports, and the one table ``make bench`` prints from them.

Each benchmark script measures flowpin and its baseline side by side in one run and, given
``--figures PATH``, writes its headline figures there as JSON (a list of :class:`Figure`).
``benchmarks/run_all.py`` runs every script and prints them as one table.

A figure's ``ratio`` is always *flowpin's time over the baseline's time for the same work* (1.00 = as
fast as the baseline, 0.50 = twice as fast, 1.10 = 10% slower), so the column reads the same way for
every row; ``value``/``unit`` give the absolute figure (throughput or time) beside it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Figure:
    benchmark: str
    """Which script measured it: hashing, verify, data, tracking, checkpoint."""
    measure: str
    """What flowpin did, e.g. ``flowpin sha256, 1 file of 1024 MiB``."""
    value: float
    unit: str
    baseline: str
    """What it is compared with, measured in the same run, e.g. ``hashlib sha256, one thread``."""
    ratio: float
    """flowpin's seconds / the baseline's seconds for the same work."""
    target: str = ""
    """The issue's target for this ratio or value, if it sets one (e.g. ``<= 1.05``)."""

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_figures(path: str | None, figures: Iterable[Figure]) -> None:
    """Write ``figures`` to ``path`` as JSON (no-op when ``path`` is None: the script ran on its own)."""
    if path is None:
        return
    Path(path).write_text(json.dumps([f.as_json() for f in figures], indent=1) + "\n")


def read_figures(path: Path) -> list[Figure]:
    return [Figure(**entry) for entry in json.loads(path.read_text())]


def _cell(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def table(figures: Sequence[Figure]) -> str:
    """One Markdown table of every figure (also readable in a terminal)."""
    header = ("benchmark", "flowpin measure", "value", "baseline (same run)", "time ratio", "target")
    rows = [
        (f.benchmark, f.measure, f"{_cell(f.value)} {f.unit}", f.baseline, _ratio(f.ratio), f.target) for f in figures
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
