"""The stat cache: a file's digest remembered under its stat key, so unchanged files are not read again.

A :class:`StatCache` maps the symlink-free path of a file and an algorithm to the file's ``(device, inode,
size, mtime_ns, ctime_ns)`` and its content and raw digests, in a local SQLite database
(``.flowpin/cache/digests.sqlite``, gitignored: never hashed or shipped). A row answers only while every
field of the stat key is unchanged. A file modified less than :data:`RACY_WINDOW_NS` before hashing began is
not stored (:func:`settled`): a second write within the filesystem's timestamp granularity could otherwise go
unnoticed. The cache is a local speed-up, never evidence: whoever can write ``.flowpin/`` can edit it, so a
release or a rebuild hashes without it (``docs/hardening.md``).

:class:`~flowpin.hashing.hasher.Hasher` looks rows up before hashing and stores what it read;
:mod:`flowpin.hashing.pool`'s workers compare each file's fresh stat key with the row they were handed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from flowpin.errors import WriteError

RACY_WINDOW_NS = 2_000_000_000

StatKey = tuple[int, int, int, int, int]
"""``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` of a file."""
Cached = tuple[tuple[int, ...], str, str]
"""A stat-cache row: (stat key, content digest, raw digest)."""


def settled(key: tuple[int, ...], now_ns: int) -> bool:
    """Whether a file with stat ``key`` may be cached by a hash that began at ``now_ns``: its last change
    (mtime or ctime) lies more than :data:`RACY_WINDOW_NS` before."""
    return now_ns - max(key[3], key[4]) > RACY_WINDOW_NS


class StatCache:
    """Persistent ``real path → (stat key, digest)`` map in SQLite (local, never hashed or shipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS digests_v2 (path TEXT, algorithm TEXT, dev INT, ino INT, size INT,"
                " mtime_ns INT, ctime_ns INT, digest TEXT, raw TEXT, PRIMARY KEY (path, algorithm))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: Exception) -> WriteError:
        """SQLite reports a full disk or a file size limit as "disk I/O error" or "database or disk is full"."""
        return WriteError(
            f"could not write the digest stat cache {self.path} ({exc}): the disk may be full or a file size limit "
            f"(ulimit -f) was hit; free space on the filesystem of {self.path.parent} (or raise the limit) and "
            f"rerun; deleting {self.path.parent} only drops cached digests"
        )

    def lookup(self, paths: Sequence[str], algorithm: str) -> dict[str, Cached]:
        """``real path → (stat key, content digest, raw digest)`` for the paths the cache holds."""
        found: dict[str, Cached] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT path, dev, ino, size, mtime_ns, ctime_ns, digest, raw FROM digests_v2 "  # noqa: S608
                f"WHERE algorithm = ? AND path IN ({marks})",
                (algorithm, *chunk),
            )
            for path, dev, ino, size, mtime, ctime, digest, raw in rows:
                found[path] = ((dev, ino, size, mtime, ctime), digest, raw)
        return found

    def store(self, entries: Iterable[tuple[str, tuple[int, ...], str, str]], algorithm: str) -> None:
        rows = [(path, algorithm, *key, digest, raw) for path, key, digest, raw in entries]
        if rows:
            try:
                with self._db:
                    self._db.executemany("INSERT OR REPLACE INTO digests_v2 VALUES (?,?,?,?,?,?,?,?,?)", rows)
            except sqlite3.Error as exc:
                raise self._write_error(exc) from exc

    def close(self) -> None:
        self._db.close()


def default_cache(root: Path) -> StatCache:
    """The project's stat cache, ``.flowpin/cache/digests.sqlite`` (gitignored)."""
    return StatCache(root / ".flowpin" / "cache" / "digests.sqlite")
