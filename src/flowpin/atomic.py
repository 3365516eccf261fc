"""Atomic publication of files and directories.

A reader sees either the old artifact or the complete new one, never a prefix: content goes to a
temporary sibling, is fsynced, renamed over the target, and the parent directory is fsynced so the
rename itself survives a crash. A failure removes the temporary and raises :class:`WriteError`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flowpin.errors import WriteError


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames/creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Open a binary temp file next to ``path``; on clean exit publish it atomically as ``path``.

    On an exception inside the block the temporary is removed and the previous ``path`` (if any) is
    left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"could not write {target}: {exc.strerror or exc}; nothing was published") from exc
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_open(path, mode=mode) as fh:
        fh.write(data)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; on clean exit it replaces ``path`` as a whole.

    Files written inside should still be fsynced (use :func:`atomic_open` or :func:`fsync_file`).
    An existing ``path`` is moved aside and removed only after the new directory is in place, so a
    crash leaves either the old or the new tree under ``path`` (plus a hidden ``.old`` sibling to
    clean up), never a partial one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_dir() and not child.is_symlink():
                fsync_dir(child)
        fsync_dir(tmp)
        old: Path | None = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WriteError(f"could not publish {target}: {exc.strerror or exc}; nothing was published") from exc
        raise


def fsync_file(path: Path) -> None:
    """fsync an already-written file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
