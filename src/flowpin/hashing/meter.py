"""Progress of hashing: a ``progress(done, total)`` hook hears the bytes of each :class:`Hasher` call.

The hook is the caller's: passed as ``Hasher(progress=...)``, or, for the Hashers that library code builds
itself (verify, rebuild), set by an entry point for a block with :func:`reporting_progress`. The
:class:`Meter` of one call calls it at most every :data:`PROGRESS_INTERVAL_S` and once at the end; ``total``
is the size of every file the call digests (taken only when a hook is listening), cache hits count as done at
once, and files hashed by forked workers (:mod:`flowpin.hashing.pool`) count when their share comes back. A
hook never changes a digest. The terminal bars that usually listen live in :mod:`flowpin.progress`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Iterator

PROGRESS_INTERVAL_S = 0.05
"""Least time between two calls of a progress hook (the last call always comes)."""

ProgressHook = Callable[[int, int], None]
"""``hook(done, total)`` in bytes; see the module docstring."""
Tick = Callable[[int], None]
"""``tick(n)``: ``n`` more bytes done (what the digest rules and the workers report)."""

_DEFAULT_PROGRESS: contextvars.ContextVar[ProgressHook | None] = contextvars.ContextVar(
    "flowpin_hash_progress", default=None
)


@contextlib.contextmanager
def reporting_progress(hook: ProgressHook | None) -> Iterator[None]:
    """Inside this block, every :class:`Hasher` created without its own ``progress`` reports to ``hook``.

    For entry points (the CLI) that drive library code which builds its own Hashers (verify, rebuild);
    the library itself never reads the terminal. ``None`` leaves things as they are.
    """
    token = _DEFAULT_PROGRESS.set(hook) if hook is not None else None
    try:
        yield
    finally:
        if token is not None:
            _DEFAULT_PROGRESS.reset(token)


def current_hook(own: ProgressHook | None) -> ProgressHook | None:
    """The hook a Hasher call reports to: its ``own``, else the :func:`reporting_progress` hook in force."""
    return own if own is not None else _DEFAULT_PROGRESS.get()


class Meter:
    """Bytes done of one Hasher call, passed to a progress hook at most every PROGRESS_INTERVAL_S."""

    def __init__(self, hook: ProgressHook, total: int) -> None:
        self.hook, self.total, self.done, self._last = hook, total, 0, time.monotonic()
        hook(0, total)

    def tick(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self.hook(min(self.done, self.total), self.total)

    def finish(self) -> None:
        self.hook(self.total, self.total)


def size_or_zero(path: str) -> int:
    """The size of ``path`` for a meter's total; 0 when it cannot be stat'ed (hashing reports that error)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
