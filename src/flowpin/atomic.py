"""Atomic publication of files and directories.

A reader sees either the old artifact or the complete new one, never a prefix: content goes to a
temporary sibling, is fsynced, renamed over the target, and the parent directory is fsynced so the
rename itself survives a crash (:func:`atomic_open`, :func:`atomic_write_bytes`). Creating a file only
where none exists (:func:`atomic_create_exclusive`: keys) takes the same write path and hard-links the
temporary instead of renaming it, so it never replaces anything. A failure removes the temporary and
raises :class:`WriteError`; a full disk or a file size limit (``ENOSPC``, ``EDQUOT``, ``EFBIG``) says so
and how to fix it. A directory is swapped in with one ``renameat2(RENAME_EXCHANGE)`` where the kernel
and filesystem offer it, so even a SIGKILL during the swap leaves the old or the new tree under its name.
The write points carry named failpoints (:mod:`flowpin.failpoints`) that the fault-injection suite arms.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from flowpin.errors import WriteError
from flowpin.failpoints import failpoint

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""errnos of a full disk, an exhausted quota and a file size limit (``ulimit -f``/``RLIMIT_FSIZE``)."""


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
    with _written_aside(target, mode, _replace) as fh:
        yield fh
        failpoint("atomic.before-fsync", str(target), prepare=fh.flush)


@contextlib.contextmanager
def _written_aside(target: Path, mode: int, publish: Callable[[Path, Path], None]) -> Iterator[IO[bytes]]:
    """The one write path: a temporary sibling of ``target`` to write; after the block it is flushed,
    fsynced, given ``mode`` and handed to ``publish(tmp, target)``, which puts it in place (and fsyncs the
    parent directory). Any failure removes the temporary; an ``OSError`` becomes a :class:`WriteError`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        publish(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(target, exc) from exc
        raise


def _replace(tmp: Path, target: Path) -> None:
    """Publish by ``rename(2)`` over whatever ``target`` was."""
    failpoint("atomic.before-rename", str(target))
    os.replace(tmp, target)
    failpoint("atomic.after-rename", str(target))
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_open(path, mode=mode) as fh:
        view, half = memoryview(data), len(data) // 2
        fh.write(view[:half])
        failpoint("atomic.partial", os.fspath(path), prepare=fh.flush)
        fh.write(view[half:])


_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)
"""errnos of a filesystem (or mount) that offers no hard link here."""


def atomic_create_exclusive(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> bool:
    """Publish ``data`` as ``path`` only if nothing is there yet; True if this call created it.

    ``O_EXCL`` semantics without a partial file: the content goes to a temporary sibling, is fsynced
    (the write path of :func:`atomic_open`), then hard-linked to ``path`` (``link(2)`` fails with ``EEXIST``
    when another process got there first, and never replaces anything), and the temporary is removed. Of
    concurrent callers exactly one returns True; the others return False and leave the winner's file
    untouched. A filesystem without hard links gets ``open(O_CREAT | O_EXCL)`` and a write in place instead
    (a crash then may leave a partial file).
    """
    created = False

    def link(tmp: Path, target: Path) -> None:
        nonlocal created
        try:
            created = _link_exclusive(tmp, target, data, mode)
        finally:
            tmp.unlink(missing_ok=True)  # the link (or the in-place copy) holds the content now

    with _written_aside(Path(path), mode, link) as fh:
        fh.write(data)
    return created


def _link_exclusive(tmp: Path, target: Path, data: bytes, mode: int) -> bool:
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        return _create_in_place(target, data, mode)
    fsync_dir(target.parent)
    return True


def _create_in_place(target: Path, data: bytes, mode: int) -> bool:
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may have narrowed the creation mode
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return True


def write_error(target: Path, exc: OSError) -> WriteError:
    """The :class:`WriteError` for an ``OSError`` raised while publishing ``target`` (chain it ``from exc``)."""
    if exc.errno in _FULL:
        return WriteError(
            f"could not write {target}: {exc.strerror or exc} -- the disk is full or a file size limit "
            f"(ulimit -f) was hit; free space on the filesystem of {target.parent} (or raise the limit) and "
            "rerun; nothing was published and the previous version, if any, is intact"
        )
    return WriteError(f"could not write {target}: {exc.strerror or exc}; nothing was published")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; on clean exit it replaces ``path`` as a whole.

    Files written inside should still be fsynced (use :func:`atomic_open` or :func:`fsync_file`).
    An existing ``path`` is exchanged with the new tree in one ``renameat2(RENAME_EXCHANGE)`` and removed
    afterwards, so a crash leaves either the old or the new tree under ``path`` (plus a hidden ``.tmp``
    sibling to clean up), never a partial one. Where the exchange is unsupported the old tree is renamed
    aside first (``.<name>.old-<pid>``), leaving a window in which a crash leaves ``path`` absent.
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
        failpoint("atomic.dir-before-swap", str(target))
        old: Path | None = None
        if not (target.exists() or target.is_symlink()):
            os.replace(tmp, target)
        elif _exchange(tmp, target):
            old = tmp  # the old tree now sits under the temporary's name
        else:  # no RENAME_EXCHANGE here: a SIGKILL between the two renames leaves the old tree at ``old``
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
        fsync_dir(target.parent)
        failpoint("atomic.dir-after-swap", str(target))
        if old is not None:
            _remove(old)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)  # the partial new tree, or (after an exchange) the old one
        if isinstance(exc, OSError):
            raise write_error(target, exc) from exc
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (Linux ``renameat2``); False where that is unsupported."""
    func = getattr(_libc(), "renameat2", None)
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def fsync_file(path: Path) -> None:
    """fsync an already-written file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
