"""Opening files a user or an attacker may have replaced: regular files only, bounded, never blocking.

Every read of a path flowpin did not just create itself (manifests, ``release.json``, checkpoint files,
``index.json``, key files, signatures) goes through this module, so that a FIFO, a device, a directory or
a socket in place of the file is refused *before* anything is read -- instead of hanging forever (a FIFO
with no writer, a blocking device), exhausting memory (``/dev/zero``, ``/dev/urandom``) or reading
something that is not the artifact at all.

The rule, in order:

1. ``os.open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)`` -- plus ``O_NOFOLLOW`` when the caller does not
   follow a final symlink. ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a
   writer; a socket cannot be opened at all (``ENXIO``), a symlink under ``O_NOFOLLOW`` fails with
   ``ELOOP`` -- both are reported as :class:`~flowpin.errors.NotRegularFileError`.
2. ``fstat`` on the *opened descriptor* (not the path: no race between the check and the read) must say
   ``S_ISREG``; otherwise :class:`~flowpin.errors.NotRegularFileError` names what the path is.
3. Its size must be at most the caller's bound (:class:`~flowpin.errors.FileTooLargeError` otherwise);
   :func:`read_regular` also stops reading one byte past the bound, so a file that grows after the
   ``fstat`` is refused too.
4. ``O_NONBLOCK`` is cleared again (it means nothing for regular files, but the descriptor is handed on).

Errors of the file system itself (no such file, permission denied) are left as the :class:`OSError`
they are, so that each caller keeps its own "missing" and "unreadable" messages. :func:`open_regular`
yields the descriptor for callers that stream (hashing), :func:`read_regular` returns the bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flowpin.errors import FileTooLargeError, NotRegularFileError

DEFAULT_FIX = "replace it with the regular file flowpin wrote (restore it, or re-run the step that writes it)"

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe): reading it would wait for a writer, possibly forever"),
    (stat.S_ISCHR, "a character device: reading it may never end (e.g. /dev/zero) or block"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def describe_mode(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words (``"a FIFO (named pipe): ..."``)."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return f"not a regular file (mode {stat.S_IFMT(mode):o})"


@dataclasses.dataclass(frozen=True)
class RegularFile:
    """An open descriptor of a checked regular file (valid inside :func:`open_regular` only)."""

    fd: int
    """Blocking, close-on-exec, read-only; closed when the ``with`` block ends."""
    stat: os.stat_result
    """``fstat`` of ``fd`` taken when it was checked."""
    path: Path
    max_bytes: int | None
    """The bound it was opened with (``None``: unbounded)."""
    what: str
    fix: str

    @property
    def size(self) -> int:
        return self.stat.st_size

    def reader(self) -> IO[bytes]:
        """An unbuffered binary file object over ``fd`` that does not close it (for stream readers)."""
        return os.fdopen(self.fd, "rb", buffering=0, closefd=False)

    def read_all(self) -> bytes:
        """Everything from the current offset to EOF; a file that grew past ``max_bytes`` since the check is
        refused (:class:`FileTooLargeError`) after reading at most one byte more than the bound."""
        limit = self.max_bytes
        chunks: list[bytes] = []
        total = 0
        want = max(self.size + 1, 1 << 16)  # one byte more than fstat says: a file that grew is noticed
        while True:
            chunk = os.read(self.fd, want if limit is None else min(want, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if limit is not None and total > limit:
                raise _too_large(self.path, total, limit, self.what, self.fix, grew=True)


def open_flags(*, follow_symlinks: bool = True) -> int:
    """The ``os.open`` flags of step 1 (for callers that open by themselves, then :func:`check_fd`)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    return flags if follow_symlinks else flags | os.O_NOFOLLOW


def check_fd(
    fd: int, path: str | os.PathLike[str], *, max_bytes: int | None, what: str, fix: str = DEFAULT_FIX
) -> os.stat_result:
    """Steps 2-4 for a descriptor opened with :func:`open_flags`; returns its ``fstat``.

    Raises :class:`NotRegularFileError` or :class:`FileTooLargeError`; the caller closes ``fd``.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(
            f"{what} {os.fspath(path)} is {describe_mode(st.st_mode)}, not a regular file; refusing to read it -- {fix}"
        )
    if max_bytes is not None and st.st_size > max_bytes:
        raise _too_large(path, st.st_size, max_bytes, what, fix)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return st


@contextlib.contextmanager
def open_regular(
    path: str | os.PathLike[str],
    *,
    max_bytes: int | None,
    what: str,
    follow_symlinks: bool = True,
    fix: str = DEFAULT_FIX,
) -> Iterator[RegularFile]:
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes`` (``None``: any size).

    ``what`` names the file in messages (``"manifest"``, ``"checkpoint file"``); ``fix`` says what to do.
    With ``follow_symlinks=False`` a symlink as the last component is refused. Raises
    :class:`NotRegularFileError`, :class:`FileTooLargeError`, or the :class:`OSError` of the open.
    """
    try:
        fd = os.open(path, open_flags(follow_symlinks=follow_symlinks))
    except OSError as exc:
        kind = {errno.ENXIO: "a socket (or a device with nothing behind it)", errno.ELOOP: "a symbolic link"}
        if exc.errno in kind and (exc.errno != errno.ELOOP or not follow_symlinks):
            raise NotRegularFileError(
                f"{what} {os.fspath(path)} is {kind[exc.errno]}, not a regular file; refusing to read it -- {fix}"
            ) from exc
        raise
    try:
        st = check_fd(fd, path, max_bytes=max_bytes, what=what, fix=fix)
        yield RegularFile(fd=fd, stat=st, path=Path(path), max_bytes=max_bytes, what=what, fix=fix)
    finally:
        os.close(fd)


def read_regular(
    path: str | os.PathLike[str],
    *,
    max_bytes: int,
    what: str,
    follow_symlinks: bool = True,
    fix: str = DEFAULT_FIX,
) -> bytes:
    """The whole content of ``path`` (see :func:`open_regular`), never more than ``max_bytes`` bytes."""
    with open_regular(path, max_bytes=max_bytes, what=what, follow_symlinks=follow_symlinks, fix=fix) as f:
        return f.read_all()


def _too_large(
    path: str | os.PathLike[str], size: int, limit: int, what: str, fix: str, *, grew: bool = False
) -> FileTooLargeError:
    how = "grew to" if grew else f"is {size} bytes,"
    return FileTooLargeError(
        f"{what} {os.fspath(path)} {how} more than any such file flowpin reads ({limit} bytes); refusing to read "
        f"it -- {fix}"
    )


__all__ = ["DEFAULT_FIX", "RegularFile", "check_fd", "describe_mode", "open_flags", "open_regular", "read_regular"]
