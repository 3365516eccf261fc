"""The Hasher: digests of repository artifacts (files, directories) and file sets, by the digest rules.

A :class:`Hasher` is bound to a repository root, an algorithm, an optional stat cache
(:mod:`flowpin.hashing.cache`), a number of hashing workers (:mod:`flowpin.hashing.pool`; the caller's
choice, 1 by default) and an optional progress hook (:mod:`flowpin.hashing.meter`). One call plans (lists the
files of each artifact without a stat, refusing unsafe names and symlinks that leave the repository or point
at directories), hashes every distinct real file once, and assembles :class:`ArtifactDigest` values by the
rules of :mod:`flowpin.hashing.digest`. ``stats`` adds up what its calls read and how long they took.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

from flowpin.errors import ArtifactMissingError, ArtifactUnreadableError, FlowpinError, InternalError, PathError
from flowpin.hashing.cache import Cached, StatCache, settled
from flowpin.hashing.digest import DEFAULT_ALGORITHM, ArtifactDigest, FileDigest, check_algorithm, tree_digest
from flowpin.hashing.meter import Meter, ProgressHook, current_hook, size_or_zero
from flowpin.hashing.pool import Outcome, hash_files
from flowpin.paths import check_name, resolve_inside


@dataclasses.dataclass
class HashStats:
    files: int = 0
    """Files read and hashed."""
    bytes_read: int = 0
    cache_hits: int = 0
    """Files answered by the stat cache without reading."""
    seconds: float = 0.0
    """Wall time spent digesting (planning, reading, hashing, assembling)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    path: str
    """Path to open (absolute, or relative to the working directory)."""
    real: str
    """Symlink-free absolute path: the stat-cache key and the de-duplication key."""
    label: str
    """Artifact-relative name used in error messages."""


_Plan = tuple[str, list[tuple[str, _Job]]]
"""An artifact's kind (``file``, ``directory``, ``fileset``) and its files: (relative path, job)."""


class Hasher:
    """Digests artifacts under a repository root through an optional stat cache, on ``workers`` processes."""

    def __init__(
        self,
        root: Path,
        algorithm: str = DEFAULT_ALGORITHM,
        *,
        cache: StatCache | None = None,
        workers: int = 1,
        progress: ProgressHook | None = None,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InternalError(f"Hasher(workers={workers!r}): a positive number of hashing workers")
        self.root = root
        self.algorithm = check_algorithm(algorithm)
        self.cache = cache
        self.workers = workers
        """Hashing processes (:mod:`flowpin.hashing.pool`): 1 hashes in this process; the entry point chooses
        more (:func:`~flowpin.hashing.pool.parallel_workers`)."""
        self.progress = progress
        """``progress(done, total)`` in bytes (:mod:`flowpin.hashing.meter`); ``None``: the
        :func:`~flowpin.hashing.meter.reporting_progress` hook in force, if any."""
        self.stats = HashStats()

    # -- public ---------------------------------------------------------------------------------

    def digest(self, name: str) -> ArtifactDigest:
        """Digest one repository artifact (file or directory); raises a FlowpinError on failure."""
        result = self.digest_all([name])[name]
        if isinstance(result, FlowpinError):
            raise result
        return result

    def digest_all(self, names: Sequence[str]) -> dict[str, ArtifactDigest | FlowpinError]:
        """Digest several repository artifacts; failures are returned per name, not raised."""
        plans: dict[str, _Plan | FlowpinError] = {}
        for name in names:
            try:
                plans[name] = self._plan(name)
            except FlowpinError as exc:
                plans[name] = exc
        return self._run(plans)

    def digest_fileset(self, name: str, base: Path, relpaths: Sequence[str]) -> ArtifactDigest:
        """Digest an explicit set of files under ``base`` (which may lie outside the repository)."""
        jobs: list[tuple[str, _Job]] = []
        real_base = base.resolve()
        for rel in sorted(set(relpaths)):
            check_name(rel)
            real = (base / rel).resolve()
            if real_base not in real.parents:
                raise PathError(f"{name}: {rel} resolves outside {base}; list files inside the base directory")
            jobs.append((rel, _Job(path=str(base / rel), real=str(real), label=f"{name}/{rel}")))
        result = self._run({name: ("fileset", jobs)})[name]
        if isinstance(result, FlowpinError):
            raise result
        return result

    # -- planning: list files, no stat (d_type from scandir is free) -----------------------------

    def _plan(self, name: str) -> _Plan:
        path = resolve_inside(name, self.root)
        try:
            exists, is_dir = path.exists(), path.is_dir()
        except OSError as exc:  # ENAMETOOLONG, EACCES on a parent directory...: exists() raises those
            raise ArtifactUnreadableError(f"{name}: cannot stat ({exc.strerror or exc}); check the name") from exc
        if not exists:
            if path.is_symlink():
                raise ArtifactMissingError(f"{name}: dangling symlink; restore its target or remove it")
            raise ArtifactMissingError(f"{name}: does not exist; rerun the stage that produces it (dvc repro)")
        if not is_dir:
            return "file", [(name, _Job(path=str(path), real=os.path.realpath(path), label=name))]
        jobs: list[tuple[str, _Job]] = []
        self._walk(name, str(path), os.path.realpath(path), "", jobs)
        return "directory", jobs

    def _walk(self, name: str, here: str, real_here: str, prefix: str, jobs: list[tuple[str, _Job]]) -> None:
        try:
            entries = list(os.scandir(here))
        except OSError as exc:
            raise ArtifactUnreadableError(f"{name}/{prefix}: cannot list ({exc.strerror}); check permissions") from exc
        for entry in entries:
            rel = prefix + entry.name
            label = f"{name}/{rel}"
            if not _is_utf8(entry.name):
                raise PathError(
                    f"{name}/{prefix}{entry.name.encode('utf-8', 'surrogateescape')!r}: file name is not valid "
                    "UTF-8; rename it (artifact names are hashed as UTF-8)"
                )
            if entry.is_symlink():
                target = resolve_inside(label, self.root)  # refuses links that leave the repository
                if target.is_dir():
                    raise PathError(
                        f"{label} is a symlink to a directory; flowpin does not follow directory symlinks "
                        "inside artifacts — copy the directory instead"
                    )
                jobs.append((rel, _Job(path=entry.path, real=str(target.resolve()), label=label)))
            elif entry.is_dir(follow_symlinks=False):
                self._walk(name, entry.path, os.path.join(real_here, entry.name), rel + "/", jobs)
            else:
                jobs.append((rel, _Job(path=entry.path, real=os.path.join(real_here, entry.name), label=label)))

    # -- execution ------------------------------------------------------------------------------

    def _run(self, plans: dict[str, _Plan | FlowpinError]) -> dict[str, ArtifactDigest | FlowpinError]:
        started = time.perf_counter()
        try:
            return self._run_plans(plans)
        finally:
            self.stats.seconds += time.perf_counter() - started

    def _run_plans(self, plans: dict[str, _Plan | FlowpinError]) -> dict[str, ArtifactDigest | FlowpinError]:
        unique: dict[str, _Job] = {}
        for plan in plans.values():
            if not isinstance(plan, FlowpinError):
                for _, job in plan[1]:
                    unique.setdefault(job.real, job)
        outcomes = self._hash_jobs(list(unique.values()))
        out: dict[str, ArtifactDigest | FlowpinError] = {}
        for name, plan in plans.items():
            if isinstance(plan, FlowpinError):
                out[name] = plan
                continue
            kind, jobs = plan
            files: list[FileDigest] = []
            error: FlowpinError | None = None
            for rel, job in jobs:
                outcome = outcomes[job.real]
                if isinstance(outcome, FlowpinError):
                    error = error or type(outcome)(f"{job.label}: {outcome}")
                    continue
                files.append(FileDigest(path=rel, digest=outcome[0], raw=outcome[1], size=outcome[2][2]))
            if error is not None:
                out[name] = error
                continue
            files.sort(key=lambda fd: fd.path)  # code point order == UTF-8 byte order
            size = sum(fd.size for fd in files)
            if kind == "file":
                out[name] = ArtifactDigest(
                    name=name,
                    algorithm=self.algorithm,
                    digest=files[0].digest,
                    raw=files[0].raw,
                    kind="file",
                    size=size,
                )
            else:
                digest = tree_digest([(fd.path, fd.digest) for fd in files], self.algorithm)
                raw = (
                    digest
                    if all(fd.raw == fd.digest for fd in files)
                    else tree_digest([(fd.path, fd.raw) for fd in files], self.algorithm)
                )
                out[name] = ArtifactDigest(
                    name=name,
                    algorithm=self.algorithm,
                    digest=digest,
                    raw=raw,
                    kind=kind,
                    size=size,
                    files=tuple(files),
                )
        return out

    def _hash_jobs(self, jobs: list[_Job]) -> dict[str, Outcome]:
        cached: dict[str, Cached] = {}
        if self.cache is not None and jobs:
            cached = self.cache.lookup([j.real for j in jobs], self.algorithm)
        items = [(j.path, cached.get(j.real)) for j in jobs]
        results: dict[str, Outcome] = {}
        fresh: list[tuple[str, tuple[int, ...], str, str]] = []
        hook = current_hook(self.progress)
        meter = Meter(hook, sum(size_or_zero(j.path) for j in jobs)) if hook is not None and jobs else None
        now = time.time_ns()  # before any read: the racy-window test must not see a later time
        outcomes = hash_files(self.algorithm, items, workers=self.workers, tick=None if meter is None else meter.tick)
        if meter is not None:
            meter.finish()
        for job, outcome in zip(jobs, outcomes, strict=True):
            results[job.real] = outcome
            if not isinstance(outcome, FlowpinError):
                digest, raw, key = outcome
                hit = cached.get(job.real)
                if hit is not None and hit[0] == key:
                    self.stats.cache_hits += 1
                else:
                    self.stats.files += 1
                    self.stats.bytes_read += key[2]
                    if settled(key, now):
                        fresh.append((job.real, key, digest, raw))
        if self.cache is not None:
            self.cache.store(fresh, self.algorithm)
        return results


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
