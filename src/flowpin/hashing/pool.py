"""Hashing workers: the files of one Hasher call hashed in this process or in forked worker processes.

How many workers is the caller's choice, made once at its entry point and passed in
(``Hasher(workers=...)``); nothing here looks at what the process has loaded. ``1`` (the library default)
hashes in this process. More forks ``workers - 1`` children for a call of :data:`PARALLEL_MIN_FILES` files
or more (:func:`hash_files`); :func:`parallel_workers` is "every core", what ``flowpin verify`` asks for.

Choosing: parallelism is by processes, not threads -- with many small files the per-file Python work holds
the GIL, and two threads measured *slower* than one. Forking copies the caller's page tables: from a plain
process 2 forked workers took 0.18 s vs 0.27 s in-process on 10k small files, but once torch was imported
0.26-0.28 s vs 0.25-0.29 s; and fork copies only the calling thread of a process that runs others
(torch's thread pools, a process group's). So an entry point that has torch loaded (training and eval
stages, recording their outputs) keeps ``1``; a command that only hashes (verify, rebuild) takes
:func:`parallel_workers`.
(forkserver/spawn would re-import the caller's ``__main__`` in every worker, which a library cannot impose.)

Every worker runs :func:`hash_batch`: stat each file, reuse the stat-cache row
(:mod:`flowpin.hashing.cache`) when its key is unchanged, else read it by the digest rules
(:mod:`flowpin.hashing.digest`; in a forked worker blake3 stays on one thread). A file's failure is a
value (a FlowpinError), not an exception. The digests never depend on the number of workers.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from flowpin.errors import ArtifactMissingError, ArtifactUnreadableError, FlowpinError
from flowpin.hashing.cache import Cached, StatKey
from flowpin.hashing.digest import hash_file_digests
from flowpin.hashing.meter import Tick

PARALLEL_MIN_FILES = 64
"""Fewer files than this are hashed in-process whatever the workers: forking would cost more than it saves."""

Item = tuple[str, Cached | None]
"""One file to hash: the path to open, and the stat-cache row the caller holds for it (if any)."""
Outcome = tuple[str, str, StatKey] | FlowpinError
"""A worker's answer for one file: (content hexdigest, raw hexdigest, stat key) or the error."""


def parallel_workers() -> int:
    """Workers for an entry point that hashes on every core (``os.cpu_count()``)."""
    return os.cpu_count() or 1


def hash_files(algorithm: str, items: list[Item], *, workers: int, tick: Tick | None = None) -> list[Outcome]:
    """Stat, check the cache and hash ``items`` on ``workers`` processes; outcomes in the order of ``items``.

    In-process when ``workers`` is 1 or there are fewer than :data:`PARALLEL_MIN_FILES` items.
    """
    if workers == 1 or len(items) < PARALLEL_MIN_FILES:
        return hash_batch(algorithm, items, tick)
    return fork_map(algorithm, items, workers, tick)


def fork_map(algorithm: str, items: list[Item], workers: int, tick: Tick | None = None) -> list[Outcome]:
    """Split ``items`` into ``workers`` contiguous shares; forked children hash all but the first, which
    this process hashes meanwhile. Children answer with JSON over a pipe (no pickle). A child that dies
    has its share redone here, so a crash costs time, never a result.

    Measured on 10k small files: a ProcessPoolExecutor spent 40-50 ms on set-up and queues out of
    ~150 ms; forking directly and working in the parent too avoids most of that.
    """
    n = len(items)
    shares = [items[i * n // workers : (i + 1) * n // workers] for i in range(workers)]
    children: list[tuple[int, int, int]] = []
    for index in range(1, workers):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: hash one share, write it, leave without running the parent's cleanup
            code = 1
            try:
                os.close(read_fd)
                outcomes = hash_batch(algorithm, shares[index], threads=False)
                payload = json.dumps([_outcome_to_json(o) for o in outcomes])
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(payload.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        children.append((index, pid, read_fd))
    results: list[list[Outcome]] = [[] for _ in range(workers)]
    results[0] = hash_batch(algorithm, shares[0], tick)  # progress: this share as it goes, the others on arrival
    for index, pid, read_fd in children:
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status == 0:
            results[index] = [_outcome_from_json(o) for o in json.loads(data)]
            if tick is not None:
                tick(sum(o[2][2] for o in results[index] if not isinstance(o, FlowpinError)))
        else:
            results[index] = hash_batch(algorithm, shares[index], tick)
    return [outcome for share in results for outcome in share]


def _outcome_to_json(outcome: Outcome) -> list[Any]:
    if isinstance(outcome, FlowpinError):
        return ["error", type(outcome).__name__, str(outcome)]
    return ["ok", outcome[0], outcome[1], list(outcome[2])]


def _outcome_from_json(value: list[Any]) -> Outcome:
    if value[0] == "error":
        cls = {c.__name__: c for c in (ArtifactMissingError, ArtifactUnreadableError)}.get(value[1], FlowpinError)
        return cls(value[2])
    key = value[3]
    return value[1], value[2], (key[0], key[1], key[2], key[3], key[4])


def hash_batch(algorithm: str, items: list[Item], tick: Tick | None = None, *, threads: bool = True) -> list[Outcome]:
    """Stat each file; reuse the cached digest when the stat key is unchanged, else read and hash it.

    Runs in worker processes too (there without ``tick``, and with ``threads=False``: see
    :func:`~flowpin.hashing.digest.hash_file_digests`); per-file failures come back as FlowpinError values.
    """
    out: list[Outcome] = []
    for path, cached in items:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                out.append(ArtifactUnreadableError("not a regular file; flowpin pins files and directories"))
                continue
            key: StatKey = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if cached is not None and cached[0] == key:
                out.append((cached[1], cached[2], key))
                if tick is not None:
                    tick(st.st_size)
            else:
                content, raw = hash_file_digests(path, algorithm, size_hint=st.st_size, on_bytes=tick, threads=threads)
                out.append((content, raw, key))
        except FlowpinError as exc:
            out.append(exc)
        except FileNotFoundError:
            out.append(ArtifactMissingError("does not exist; rerun the stage that produces it (dvc repro)"))
        except OSError as exc:
            out.append(ArtifactUnreadableError(f"cannot read ({exc.strerror}); check permissions"))
    return out
