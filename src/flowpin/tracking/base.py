"""The experiment-tracker interface the training loop reports to, and two trackers that need nothing.

A tracker receives *metadata* about a run -- its parameters and per-step metrics such as loss, LR, grad
norm and throughput. Nothing it records is part of a checkpoint's identity: a run trains the same weights
with any tracker, or none. Implementations: :class:`NullTracker` (drops everything), :class:`JsonlTracker`
(one JSON object per line, appended and flushed per line, so a killed run keeps every line it logged);
the Aim tracker implements the same :class:`Tracker` protocol.

JSONL lines are canonical JSON (sorted keys) with one exception for numbers that JSON cannot hold: a
diverged loss is written as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` instead of failing
the log call.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, runtime_checkable

from flowpin.canonical import canonical_json
from flowpin.errors import WriteError


@runtime_checkable
class Tracker(Protocol):
    """What the training loop reports to."""

    @property
    def run_id(self) -> str:
        """The tracker's id of this run (to find it in the tracker's UI/store)."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the run's parameters (a JSON-able mapping, e.g. the plain training config)."""
        ...

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        """Record ``metrics`` at optimizer step ``step``; ``context`` tags them (e.g. ``{"subset": "train"}``)."""
        ...

    def close(self) -> None:
        """Flush and release the tracker; no call is allowed after it."""
        ...


class NullTracker:
    """A tracker that records nothing."""

    def __init__(self, run_id: str = "null") -> None:
        self._run_id = run_id

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker:
    """Append one canonical-JSON object per event to ``path`` and flush it at once.

    Lines: ``{"event": "params", "params": {...}, "run": id, "time": t}`` and
    ``{"event": "metrics", "step": s, "metrics": {...}, "context": {...}, "run": id, "time": t}``
    (``time`` is Unix seconds, metadata only). A resumed run appends to the same file (first dropping a
    line a killed writer left incomplete); steps it repeats after its last checkpoint appear twice, the
    later line being the one the final weights saw.
    """

    def __init__(self, path: Path, *, run_id: str | None = None) -> None:
        self.path = path
        self._run_id = run_id if run_id is not None else uuid.uuid4().hex
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_tail(path)
            self._fh: IO[bytes] = open(path, "ab")  # noqa: SIM115 -- held open until close()
        except OSError as exc:
            raise WriteError(f"cannot open tracker log {path}: {exc.strerror or exc}; check the run directory") from exc

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write({"event": "params", "params": params})

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        self._write({"event": "metrics", "step": step, "metrics": metrics, "context": context or {}})

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> JsonlTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        line = canonical_json(_finite({**record, "run": self._run_id, "time": time.time()})) + b"\n"
        try:
            self._fh.write(line)
            self._fh.flush()
        except OSError as exc:
            raise WriteError(f"cannot append to tracker log {self.path}: {exc.strerror or exc}") from exc


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats replaced by their ECMAScript names (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _drop_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline (a killed writer's incomplete line), if it has one."""
    try:
        fh = open(path, "r+b")  # noqa: SIM115 -- closed below
    except FileNotFoundError:
        return
    with fh:
        size = fh.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            cut = fh.read(end - start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        if end != size:
            fh.truncate(end)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a :class:`JsonlTracker` log; a torn last line (the writer was killed mid-line) is skipped."""
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # the last piece is b"" or an incomplete line
    return [json.loads(line) for line in lines if line]
