"""The digest rules: what a file's, a directory's and a file set's digest is (what manifests pin).

* **File**: ``H(content)`` with ``H`` = sha256 (default) or blake3, read in 1 MiB chunks (constant
  memory). A file whose name ends in ``.zst`` is digested over its *decompressed* content: compressed
  bytes depend on the zstd library version and threading, the content does not. Decompression is
  bounded (:data:`MAX_DECOMPRESSED_BYTES`, and what the frames declare), and a truncated ``.zst`` file is
  refused, never digested as if it were shorter.
* **Directory**: every regular file below it, at any depth, listed as ``"<hexdigest>  <relpath>\\n"``
  (two spaces, like ``sha256sum``; ``relpath`` POSIX, relative to the directory), lines sorted by the
  UTF-8 bytes of ``relpath``, concatenated, and hashed with the same ``H`` (:func:`tree_digest`). Empty
  directories do not contribute. The per-file digests are returned too (manifests list them).
* **File set** (inputs outside the repository, e.g. the Python standard library): the directory rule
  applied to an explicit list of relative paths under a base directory.

Beside that content digest, every file's **raw** digest (of its bytes; different only for ``.zst`` files)
is taken in the same read, and directories get the directory rule over the raw digests too: with sha256
that is in-toto's ``dirHash``, what a verifier outside flowpin recomputes (``manifest/digests.py`` names
each digest in a manifest). :class:`ArtifactDigest` and :class:`FileDigest` are the results.

This module reads one file at a time and knows no repository: :mod:`flowpin.hashing.hasher` walks
artifacts and applies these rules, :mod:`flowpin.hashing.pool` runs them in worker processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import blake3
import zstandard

from flowpin.errors import ArtifactUnreadableError, UnsupportedAlgorithmError
from flowpin.hashing.meter import Tick

ALGORITHMS: tuple[str, ...] = ("sha256", "blake3")
DEFAULT_ALGORITHM = "sha256"
CHUNK = 1 << 20
BLAKE3_THREADED_MIN = 16 << 20
"""Inputs at least this large are hashed by blake3 on all cores."""
MAX_DECOMPRESSED_BYTES = 1 << 40
ZSTD_SUFFIX = ".zst"


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hash(algorithm: str, *, size_hint: int = 0) -> _Hash:
    """A fresh incremental hasher for ``algorithm``.

    blake3 hashes one large input on several threads (its tree structure allows it; the digest is the
    same); sha256 is inherently sequential.
    """
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        threads = blake3.blake3.AUTO if size_hint >= BLAKE3_THREADED_MIN else 1
        h: _Hash = blake3.blake3(max_threads=threads)
        return h
    raise UnsupportedAlgorithmError(f"digest algorithm {algorithm!r} is not supported; use one of {ALGORITHMS}")


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise UnsupportedAlgorithmError(f"digest algorithm {algorithm!r} is not supported; use one of {ALGORITHMS}")
    return algorithm


def hash_bytes(data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> str:
    h = new_hash(algorithm)
    h.update(data)
    return h.hexdigest()


def hash_file(
    path: Path | str, algorithm: str = DEFAULT_ALGORITHM, *, size_hint: int = CHUNK, on_bytes: Tick | None = None
) -> str:
    """Digest one file by the content rule (``.zst`` files by their decompressed content)."""
    return hash_file_digests(path, algorithm, size_hint=size_hint, on_bytes=on_bytes)[0]


def hash_file_digests(
    path: Path | str,
    algorithm: str = DEFAULT_ALGORITHM,
    *,
    size_hint: int = CHUNK,
    on_bytes: Tick | None = None,
    threads: bool = True,
) -> tuple[str, str]:
    """``(content, raw)`` digests of one file: the content rule, and the hash of the file's bytes.

    They differ only for a ``.zst`` file (content = decompressed). The file is opened non-blocking and must
    be a regular file (a FIFO or device swapped in after the caller's stat is refused, never read).
    ``size_hint`` (the size from a recent stat) lets small files be read in one right-sized call.
    ``on_bytes(n)`` hears every read of ``n`` file bytes (a ``.zst`` file's size once, when done).
    ``threads=False`` keeps blake3 on this thread for any size (a forked worker: fork copies no thread pool,
    and blake3's pool, started in the parent before the fork, would wait for threads the child lacks).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactUnreadableError(
                f"{path}: not a regular file (mode {stat.filemode(st.st_mode)}); flowpin pins files and directories "
                "-- replace it with the real file"
            )
        if str(path).endswith(ZSTD_SUFFIX):
            return _hash_zstd(fd, path, algorithm, st.st_size, on_bytes, threads=threads)
        h = new_hash(algorithm, size_hint=size_hint if threads else 0)
        want = min(size_hint + 1, CHUNK)
        first = os.read(fd, want)  # small files: one right-sized read (the common case for many files)
        h.update(first)
        if on_bytes is not None:
            on_bytes(len(first))
        if len(first) == want:  # large file: stream the rest through one reusable buffer
            buf = bytearray(CHUNK if algorithm == "sha256" else 16 * CHUNK)  # blake3 threads need big updates
            view = memoryview(buf)
            while n := os.readv(fd, [buf]):
                h.update(view[:n])
                if on_bytes is not None:
                    on_bytes(n)
        digest = h.hexdigest()
        return digest, digest
    finally:
        os.close(fd)


class _TeeReader:
    """A read-only file object over ``fd`` that feeds every byte it returns to a second hash."""

    def __init__(self, fd: int, h: _Hash) -> None:
        self.fd, self.h = fd, h

    def read(self, n: int = -1) -> bytes:
        data = os.read(self.fd, n if n >= 0 else CHUNK)
        self.h.update(data)
        return data


def _hash_zstd(
    fd: int, path: Path | str, algorithm: str, size: int, on_bytes: Tick | None, *, threads: bool
) -> tuple[str, str]:
    content = new_hash(algorithm, size_hint=size if threads else 0)
    raw = new_hash(algorithm, size_hint=size if threads else 0)
    try:  # what the frames declare bounds the decompression (a lying header is a zstd bomb)
        declared = _check_zstd_complete(fd, path)
    except ArtifactUnreadableError:
        declared = None  # reported by the check below, after the content (corrupt vs truncated)
    tee = _TeeReader(fd, raw)
    _update_zstd(content, tee, path, declared)
    while tee.read(CHUNK):  # bytes after the last frame the decompressor did not ask for (skippable frames)
        pass
    _check_zstd_complete(fd, path)
    if on_bytes is not None:
        on_bytes(size)
    return content.hexdigest(), raw.hexdigest()


def _update_zstd(h: _Hash, raw: Any, path: Path | str, declared: int | None = None) -> None:
    """Hash the decompressed content; more than ``declared`` bytes (the frames' sum) or the cap is refused."""
    total = 0
    limit = MAX_DECOMPRESSED_BYTES if declared is None else min(declared, MAX_DECOMPRESSED_BYTES)
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    try:
        while chunk := reader.read(CHUNK):
            total += len(chunk)
            if total > limit:
                raise ArtifactUnreadableError(
                    f"{path}: decompresses to more than {limit} bytes (what its frames declare, or the cap); "
                    "refusing (zstd bomb?) -- regenerate the file"
                )
            h.update(chunk)
    except zstandard.ZstdError as exc:
        raise ArtifactUnreadableError(f"{path}: corrupt zstd data ({exc}); regenerate the file") from exc


_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def _check_zstd_complete(fd: int, path: Path | str) -> int | None:
    """Walk frame and block headers to the end of the file; the sum of the frames' declared content sizes.

    python-zstandard's stream_reader ends silently, as if the content were shorter, when the input stops
    inside a frame; a truncated ``.zst`` must not get a digest. Reads 3 bytes per block, not the data.
    Returns None when some frame does not declare its size.
    """
    size, pos = os.fstat(fd).st_size, 0
    declared: int | None = 0
    truncated = ArtifactUnreadableError(f"{path}: truncated zstd data (ends inside a frame); regenerate the file")
    if size == 0:
        raise truncated
    while pos < size:
        head = os.pread(fd, 18, pos)  # magic + the largest frame header
        if len(head) >= 8 and int.from_bytes(head[:4], "little") in _ZSTD_SKIPPABLE:
            pos += 8 + int.from_bytes(head[4:8], "little")
            continue
        try:
            pos += zstandard.frame_header_size(head)
            params = zstandard.get_frame_parameters(head)
        except zstandard.ZstdError as exc:
            raise truncated from exc
        checksum = params.has_checksum
        known = params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR)
        declared = declared + params.content_size if declared is not None and known else None
        last = False
        while not last and len(block := os.pread(fd, 3, pos)) == 3:
            header = int.from_bytes(block, "little")
            last = bool(header & 1)
            pos += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)  # RLE blocks store one byte
        if not last:
            raise truncated
        pos += 4 if checksum else 0
    if pos != size:
        raise truncated
    return declared


def tree_digest(files: Sequence[tuple[str, str]], algorithm: str) -> str:
    """The directory rule over ``(relpath, hexdigest)`` pairs."""
    lines = sorted(files, key=lambda item: item[0].encode("utf-8"))
    h = new_hash(algorithm)
    for rel, digest in lines:
        h.update(f"{digest}  {rel}\n".encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileDigest:
    path: str
    """POSIX path relative to the artifact (a directory) or the artifact name itself (a file)."""
    digest: str
    """The content rule (a ``.zst`` file by its decompressed content)."""
    size: int
    raw: str = ""
    """The digest of the file's bytes (equal to ``digest`` except for ``.zst`` files)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArtifactDigest:
    name: str
    algorithm: str
    digest: str
    kind: str
    """``file``, ``directory`` or ``fileset``."""
    size: int
    files: tuple[FileDigest, ...] = ()
    """Per-file digests of a directory or file set (empty for a single file)."""
    raw: str = ""
    """Over the bytes: a file's hash, or the directory rule over the files' byte digests (with sha256 this is
    in-toto's ``dirHash``). Equal to ``digest`` unless ``.zst`` files are involved."""
