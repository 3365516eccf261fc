"""Progress bars for long work (hashing large artifacts, training steps, sweeps) -- on a terminal only.

A bar renders on stderr when, and only when, a person is watching: stderr is a TTY, ``FLOWPIN_PROGRESS``
is not ``0`` and ``CI`` is not set. Piped, redirected (``dvc repro`` into a log, ``flowpin rebuild``'s
stage logs), under pytest's capture or in CI logs, every helper here is a no-op that costs one check and
never imports tqdm. ``force=True`` renders anyway (tests; a caller that knows better), ``force=False``
never renders.

Nothing here may influence results: bars only read the numbers they are given, and they write only to
the terminal, never into a file that is hashed or recorded.

* :class:`Progress` -- a bar you drive: ``update(n)``, ``set(done, total)``, ``write(line)`` (prints above
  the bar), ``describe(text)``; a context manager. ``total=None`` gives a counter without a percentage.
* :func:`track` -- wrap an iterable: ``for job in track(jobs, "sweep", unit="run"): ...``.
* :func:`callback_progress` -- a ``(done, total)`` callback, the shape of the hooks in
  :class:`flowpin.hashing.Hasher` (``progress=``, bytes) and :func:`flowpin.train.loop.train`
  (``progress=``, steps). Yields ``None`` when no bar would render, so the hooked code skips even the
  bookkeeping. A callback's total may change between calls (each ``Hasher`` call is a new series): a new
  series starts a new bar.
* :func:`hash_progress` and :func:`step_progress` -- :func:`callback_progress` preset for bytes
  (transient, shown only after half a second, so the many tiny hashes of a stage never flicker) and for
  optimizer steps.
* :class:`PollingProgress` -- a bar fed by polling ``poll() -> (done, total)`` from a daemon thread, for
  work whose progress lives elsewhere (a sweep's job-state files, written by other processes or
  machines); start it, ``close()`` it when the work ends (also a context manager).

tqdm draws the bars (a dependency through DVC; pinned in ``requirements.lock``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

from flowpin import settings
from flowpin.settings import Settings

T = TypeVar("T")

ENV_VAR = settings.PROGRESS
"""``FLOWPIN_PROGRESS=0`` turns every bar off, even on a terminal."""

ProgressHook = Callable[[int, int], None]
"""``hook(done, total)``: absolute position and size of the current piece of work."""
FALLBACK_SIZE = (80, 24)
"""Columns and rows assumed on a terminal that reports no size (a fresh pty says 0 x 0: tqdm draws nothing)."""


def progress_enabled(stream: IO[str] | None = None, *, force: bool | None = None) -> bool:
    """Whether a bar on ``stream`` (default ``sys.stderr``) renders: see the module docstring."""
    if force is not None:
        return force
    if Settings.from_env().progress_off:  # FLOWPIN_PROGRESS=0, or CI
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _size_args(stream: IO[str]) -> dict[str, Any]:
    """tqdm's size arguments: follow the terminal's size, or a fixed one where it reports none."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": FALLBACK_SIZE[0], "nrows": FALLBACK_SIZE[1]}


class Progress:
    """One progress bar on stderr (or ``stream``) that renders only on a terminal (:func:`progress_enabled`).

    ``unit="B"`` shows bytes, scaled by 1024 (tqdm prints k, M, G). ``delay`` seconds pass before the bar
    first appears (work finished sooner never shows one); ``leave=False`` erases it when closed.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        unit: str = "it",
        force: bool | None = None,
        stream: IO[str] | None = None,
        delay: float = 0.0,
        leave: bool = True,
        initial: int = 0,
    ) -> None:
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_enabled(self.stream, force=force)
        self._bar: Any = None
        if self.enabled:
            from tqdm import tqdm  # no type stubs: ignored in pyproject's mypy overrides

            binary = unit == "B"
            self._bar = tqdm(
                desc=desc,
                total=total,
                initial=initial,
                unit=unit,
                unit_scale=binary,
                unit_divisor=1024 if binary else 1000,
                file=self.stream,
                delay=delay,
                leave=leave,
                **_size_args(self.stream),
            )

    def update(self, n: int = 1) -> None:
        """Advance by ``n``."""
        if self._bar is not None:
            self._bar.update(n)

    def set(self, done: int, total: int | None = None) -> None:
        """Move to the absolute position ``done`` (and change the total when given)."""
        if self._bar is None:
            return
        if total is not None and total != self._bar.total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    @property
    def position(self) -> int:
        """Where the bar stands (0 when disabled)."""
        return int(self._bar.n) if self._bar is not None else 0

    @property
    def total(self) -> int | None:
        return None if self._bar is None or self._bar.total is None else int(self._bar.total)

    def describe(self, text: str) -> None:
        """Replace the text after the counter (e.g. the job running now)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, line: str) -> None:
        """Print ``line`` to stdout; with a bar on screen, above it (so the bar is not torn)."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    iterable: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    force: bool | None = None,
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Yield from ``iterable`` with a bar that advances per item (``total`` defaults to ``len()`` if any)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(desc, total, unit=unit, force=force, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update()


class _SeriesBar:
    """A ``(done, total)`` callback drawing one bar per series (a new total or a step back starts one)."""

    def __init__(self, make: Callable[[int, int], Progress]) -> None:
        self._make = make
        self._bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        bar = self._bar
        if bar is None or total != bar.total or done < bar.position:
            self.close()
            bar = self._bar = self._make(done, total)
        bar.set(min(done, total) if total > 0 else done)
        if total > 0 and done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def callback_progress(
    desc: str,
    *,
    unit: str = "it",
    force: bool | None = None,
    stream: IO[str] | None = None,
    delay: float = 0.0,
    leave: bool = True,
) -> Iterator[ProgressHook | None]:
    """A ``(done, total)`` hook drawing a bar, or ``None`` when no bar would render (see the module docstring)."""
    out = sys.stderr if stream is None else stream
    if not progress_enabled(out, force=force):
        yield None
        return

    def make(done: int, total: int) -> Progress:
        return Progress(
            desc, total, unit=unit, force=True, stream=out, delay=delay, leave=leave, initial=min(done, total)
        )

    series = _SeriesBar(make)
    try:
        yield series
    finally:
        series.close()


class PollingProgress:
    """A bar that asks ``poll()`` for ``(done, total)`` every ``interval`` seconds, from a daemon thread.

    Disabled (not a terminal), it starts no thread and never calls ``poll``. A poll that fails with
    ``OSError`` or ``ValueError`` (a state file being replaced, half-written JSON) is skipped until the next
    tick. ``close()`` stops the thread, polls a last time and closes the bar.
    """

    def __init__(
        self,
        desc: str,
        poll: Callable[[], tuple[int, int | None]],
        *,
        interval: float = 0.5,
        unit: str = "it",
        force: bool | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.bar = Progress(desc, None, unit=unit, force=force, stream=stream)
        self._poll, self._interval = poll, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.bar.enabled:
            self._thread = threading.Thread(target=self._run, name="flowpin-progress", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._tick()
            if self._stop.wait(self._interval):
                return

    def _tick(self) -> None:
        try:
            done, total = self._poll()
        except (OSError, ValueError):
            return
        self.bar.set(done, total)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._tick()
        self.bar.close()

    def __enter__(self) -> PollingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hash_progress(
    desc: str = "hashing", *, force: bool | None = None, stream: IO[str] | None = None
) -> contextlib.AbstractContextManager[ProgressHook | None]:
    """Bytes hashed, for ``Hasher(progress=...)``: transient, and only for work that takes over half a second."""
    return callback_progress(desc, unit="B", force=force, stream=stream, delay=0.5, leave=False)


def step_progress(
    desc: str, *, force: bool | None = None, stream: IO[str] | None = None
) -> contextlib.AbstractContextManager[ProgressHook | None]:
    """Optimizer steps, for ``flowpin.train.loop.train(progress=...)`` (called with ``(step, steps)``)."""
    return callback_progress(desc, unit="step", force=force, stream=stream)


__all__ = [
    "ENV_VAR",
    "PollingProgress",
    "Progress",
    "ProgressHook",
    "callback_progress",
    "hash_progress",
    "progress_enabled",
    "step_progress",
    "track",
]
