"""Named failpoints: a real SIGKILL at a chosen write point, for the fault-injection suite.

In the style of etcd's gofail: the write paths call :func:`failpoint` with a fixed name and a detail
(usually the path being written). The call is a no-op -- one environment lookup -- unless
``FLOWPIN_FAILPOINT`` is set to ``NAME[:MATCH][@N]``: then the ``N``-th hit (default 1) of failpoint
``NAME`` whose detail contains ``MATCH`` kills the process with ``SIGKILL`` (no ``finally`` block, no
atexit handler, no buffered write runs: exactly what the kernel's OOM killer or a lost node does)::

    FLOWPIN_FAILPOINT="atomic.before-rename:manifests/@1" python stages/synth.py

A malformed value raises :class:`~flowpin.errors.FailpointError` at the first failpoint reached, so a
typo never silently turns a fault test into a clean run. ``tests/test_faults.py`` drives every name below.

Catalogue (name -- where it fires -- what is on disk when it does):

``atomic.partial`` -- :func:`flowpin.atomic.atomic_write_bytes`: half of the bytes are in the temporary
    sibling (flushed), the target is untouched.
``atomic.before-fsync`` -- :func:`flowpin.atomic.atomic_open`: all content is in the temporary sibling
    (flushed, not fsynced), not renamed.
``atomic.before-rename`` -- :func:`flowpin.atomic.atomic_open`: the temporary is fsynced, not renamed.
``atomic.after-rename`` -- :func:`flowpin.atomic.atomic_open`: renamed over the target, parent directory
    not yet fsynced.
``atomic.dir-before-swap`` -- :func:`flowpin.atomic.atomic_directory`: the new tree is complete and
    fsynced beside the target, not swapped in.
``atomic.dir-after-swap`` -- :func:`flowpin.atomic.atomic_directory`: the new tree is in place, the old
    one not yet removed.
``shards.before-shard`` -- :func:`flowpin.data.shards.write_shards`: before each shard is written (detail:
    the shard's path); ``@2`` fires after the first shard was published.
``checkpoint.before-file`` -- :func:`flowpin.train.checkpoint.save_checkpoint`: before each tensor file
    (detail: its path in the temporary checkpoint directory).
``checkpoint.before-state`` -- the same: every tensor file written, ``state.json`` not.
``manifest.before-write`` -- :func:`flowpin.manifest.record.record`: outputs digested, the statement not
    yet signed and written (the previous manifest was already removed on entry).
``key.after-private`` -- :func:`flowpin.signing.init_key`: the private key is written, its public key is
    not yet in the trust store ``keys/``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from collections.abc import Callable

from flowpin import settings
from flowpin.errors import FailpointError
from flowpin.settings import Settings

ENV = settings.FAILPOINT
"""The environment variable that arms one failpoint: ``NAME[:MATCH][@N]``."""

NAMES = frozenset(
    {
        "atomic.partial",
        "atomic.before-fsync",
        "atomic.before-rename",
        "atomic.after-rename",
        "atomic.dir-before-swap",
        "atomic.dir-after-swap",
        "shards.before-shard",
        "checkpoint.before-file",
        "checkpoint.before-state",
        "manifest.before-write",
        "key.after-private",
    }
)
"""Every failpoint name placed in the code (the catalogue in the module docstring)."""

_SPEC = re.compile(r"(?P<name>[a-z][a-z0-9.-]*)(?::(?P<match>[^@]*))?(?:@(?P<nth>[0-9]+))?")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failpoint:
    """One armed failpoint, parsed from ``FLOWPIN_FAILPOINT``."""

    name: str
    """A name from :data:`NAMES`."""
    match: str = ""
    """A substring the hit's detail must contain (empty: any detail)."""
    nth: int = 1
    """Which matching hit kills (1-based)."""


def parse(value: str) -> Failpoint:
    """Parse ``NAME[:MATCH][@N]``; raises :class:`FailpointError` naming what is wrong."""
    m = _SPEC.fullmatch(value.strip())
    if m is None:
        raise FailpointError(f"{ENV}={value!r}: not NAME[:MATCH][@N]; e.g. {ENV}='atomic.before-rename:manifests/@1'")
    name = m["name"]
    if name not in NAMES:
        raise FailpointError(f"{ENV}={value!r}: unknown failpoint {name!r}; known: {', '.join(sorted(NAMES))}")
    nth = int(m["nth"]) if m["nth"] is not None else 1
    if nth < 1:
        raise FailpointError(f"{ENV}={value!r}: @{nth} counts hits from 1; use @1 for the first hit")
    return Failpoint(name=name, match=m["match"] or "", nth=nth)


_armed: tuple[str, Failpoint] | None = None
_hits = 0


def failpoint(name: str, detail: str = "", *, prepare: Callable[[], object] | None = None) -> None:
    """SIGKILL this process if ``name`` is the armed failpoint and this is its chosen hit; else nothing.

    ``prepare`` runs just before the kill (e.g. ``fh.flush`` so that buffered bytes reach the file and
    the kill leaves what a crash mid-write leaves).
    """
    value = Settings.from_env().failpoint
    if not value:
        return
    global _armed, _hits
    if _armed is None or _armed[0] != value:
        _armed, _hits = (value, parse(value)), 0
    spec = _armed[1]
    if name != spec.name or spec.match not in detail:
        return
    _hits += 1
    if _hits == spec.nth:
        if prepare is not None:
            prepare()
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "NAMES", "Failpoint", "failpoint", "parse"]
