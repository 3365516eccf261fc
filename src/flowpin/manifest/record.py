"""The stage-facing API: declare inputs and outputs, get a signed manifest.

A stage script does::

    entry = stage_entry_point(root, src.config_name)  # the script and primary config: what rebuild re-runs
    with record("ingest", recipe=cfg, overrides=src.overrides, config_files=src.config_files, entry_point=entry) as rec:
        rec.fileset("python-stdlib", base=stdlib, files=paths, uri=python_stdlib_uri(), kind="dataset")
        ...  # do the work, writing outputs atomically
        rec.output("data/ingest")
        rec.byproduct("reports/ingest.json")

On entry the previous manifest of the stage is removed, so a failed run leaves *no* manifest (never a
stale one that vouches for half-replaced outputs). Inputs are digested when declared (before the stage
uses them); outputs and byproducts when the block exits cleanly; then the statement is built,
validated, signed and written atomically to ``manifests/<stage>.json``. If the block raises, nothing is
written and the exception propagates.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from flowpin import __version__
from flowpin.canonical import canonical_json
from flowpin.constants import MANIFEST_DIR
from flowpin.dvcfile import dvc_code_deps
from flowpin.environment import fingerprint, run_context
from flowpin.errors import DuplicateSubjectError, FlowpinError, ManifestError, RecipeError, UnverifiedManifestError
from flowpin.failpoints import failpoint
from flowpin.hashing import DEFAULT_ALGORITHM, ArtifactDigest, Hasher, default_cache, hash_bytes
from flowpin.manifest.digests import digest_set, identity_value, subjects_key
from flowpin.manifest.statement import (
    BUILD_TYPE,
    BUILDER_ID,
    MANIFEST_VERSION,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    EntryPoint,
    Manifest,
    write_manifest,
)
from flowpin.manifest.trust import FIX_DIGESTS, load_verified, require_digests
from flowpin.paths import check_output_path, find_root, resolve_inside, to_name
from flowpin.recipe import to_plain
from flowpin.settings import Settings
from flowpin.signing import Signer, load_signer

CODE_SUFFIXES = (".py", ".json", ".yaml", ".yml", ".toml")


def descriptor(d: ArtifactDigest, **annotations: Any) -> dict[str, Any]:
    """An in-toto ResourceDescriptor for a digested artifact (digest keys: :mod:`flowpin.manifest.digests`)."""
    ann: dict[str, Any] = {"flowpin.type": d.kind, "flowpin.size": d.size, **annotations}
    if d.files:
        ann["flowpin.files"] = {f.path: f.digest for f in d.files}
    return {"name": d.name, "digest": digest_set(d), "annotations": ann}


def note_descriptor(name: str, annotations: dict[str, Any]) -> dict[str, Any]:
    """A ResourceDescriptor for a small JSON note (run context, tracker run, sweep job): its canonical JSON is
    the descriptor's ``content`` (base64) and ``digest.sha256`` is that content's sha256, so an in-toto
    verifier has something to check; ``annotations`` repeat it for people reading the manifest."""
    body = canonical_json(annotations)
    return {
        "name": name,
        "digest": {"sha256": hash_bytes(body, "sha256")},
        "content": base64.b64encode(body).decode("ascii"),
        "mediaType": "application/json",
        "annotations": annotations,
    }


RUN_CONTEXT_FIELDS = ("hostname", "user", "pid", "executable", "cwd")
"""What ``provenance.run_context`` may publish about the process that ran a stage (none by default)."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _main_script(root: Path) -> Path | None:
    """The script this process runs (the stage entry point), if it lies inside the repository."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        return None
    path = Path(main_file).resolve()
    return path if root.resolve() in path.parents else None


def entry_script(root: Path) -> str | None:
    """The repository name of the stage script that runs this process, or None (a library caller, a test).

    ``__main__``'s file when it lies in the repository (``python stages/train.py``, ``dvc repro``,
    ``torchrun``). In a Hydra launcher's worker process (joblib, submitit) ``__main__`` is the launcher's, and
    the stage script's task function arrives pickled by value, keeping its file and ``__name__ == "__main__"``:
    the script is then the innermost caller on the stack with those globals whose file lies in the repository.
    """
    real_root = root.resolve()
    main = _main_script(root)
    frame: FrameType | None = sys._getframe(1)
    while main is None and frame is not None:
        if frame.f_globals.get("__name__") == "__main__" and frame.f_code.co_filename.endswith(".py"):
            path = Path(frame.f_code.co_filename)
            if path.is_absolute() and real_root in path.resolve().parents:
                main = path.resolve()
        frame = frame.f_back
    return None if main is None else main.relative_to(real_root).as_posix()


def stage_entry_point(root: Path, config_name: str, config_dir: str = "params") -> EntryPoint | None:
    """The entry point of the running stage (:func:`entry_script`, the composed primary config); None when
    no stage script runs this process or no config was composed: such a manifest cannot be rebuilt or forked."""
    script = entry_script(root)
    if script is None or not config_name:
        return None
    return EntryPoint(script=script, config_name=config_name, config_dir=config_dir)


def source_files(directory: Path) -> list[str]:
    """Source files under ``directory`` (relative POSIX paths), skipping caches and bytecode."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for f in filenames:
            if f.endswith(CODE_SUFFIXES):
                found.append((Path(dirpath) / f).relative_to(directory).as_posix())
    return sorted(found)


class StageRecorder:
    """Collects what a stage used and produced; see :func:`record`."""

    def __init__(self, stage: str, root: Path, hasher: Hasher) -> None:
        self.stage = stage
        self.root = root
        self.hasher = hasher
        self._deps: dict[str, dict[str, Any]] = {}
        self._outputs: list[str] = []
        self._byproducts: list[str] = []
        self._extra_byproducts: list[dict[str, Any]] = []

    def _add_dep(self, entry: dict[str, Any]) -> None:
        if entry["name"] in self._deps:
            raise DuplicateSubjectError(f"stage {self.stage}: input {entry['name']!r} declared twice")
        self._deps[entry["name"]] = entry

    def input(self, path: str | os.PathLike[str], *, kind: str = "dataset") -> ArtifactDigest:
        """Declare a repository file or directory the stage reads (digested now)."""
        d = self.hasher.digest(to_name(path, self.root))
        self._add_dep(descriptor(d, kind=kind))
        return d

    def fileset(
        self, name: str, *, base: Path, files: Sequence[str], kind: str, uri: str | None = None
    ) -> ArtifactDigest:
        """Declare an explicit set of files under ``base`` (may be outside the repository)."""
        d = self.hasher.digest_fileset(name, base, files)
        entry = descriptor(d, kind=kind)
        if uri is not None:
            entry["uri"] = uri
        self._add_dep(entry)
        return d

    def code(self, path: str | os.PathLike[str]) -> ArtifactDigest:
        """Declare code the stage ran: a file, or the source files under a directory."""
        name = to_name(path, self.root)
        full = self.root / name
        if full.is_dir():
            return self.fileset(name, base=full, files=source_files(full), kind="code")
        return self.input(name, kind="code")

    def parent(self, manifest_path: str | os.PathLike[str]) -> Manifest:
        """Declare an upstream stage's manifest (returned, verified); lineage walks it.

        The manifest must be signed by a trusted key (:func:`~flowpin.manifest.trust.load_verified`):
        a stage refuses to build on an upstream record nobody vouches for (``UnverifiedManifestError``).

        The pin is the digest of the parent's *subjects* (what it produced), not of its file nor of its
        whole identity. The file also holds run times and a machine-specific signature, so two clean
        replays would never agree on a child's identity; and a parent re-run that reproduces the same
        outputs (say after an unrelated code change) leaves its children valid — exactly DVC's rule for
        skipping them. Any change to what the parent produced changes the pin.
        """
        name = to_name(manifest_path, self.root)
        parent = load_verified(
            resolve_inside(name, self.root), root=self.root, check="signature", purpose=f"record stage {self.stage}"
        )
        algorithm = self.hasher.algorithm
        self._add_dep(
            {
                "name": name,
                "digest": {subjects_key(algorithm): parent.outputs_digest(algorithm)},
                "annotations": {"flowpin.type": "manifest", "flowpin.stage": parent.stage, "kind": "manifest"},
            }
        )
        return parent

    def upstream(
        self, *, data: str | os.PathLike[str], manifest: str | os.PathLike[str], kind: str = "dataset"
    ) -> ArtifactDigest:
        """Declare an upstream stage's output directory (an input of ``kind``) and its manifest (a parent).

        When the parent pins the directory (a subject of that name), the digest just taken must be the one
        it pins: the stage reads exactly what the verified upstream record vouches for.
        """
        parent = self.parent(manifest)
        d = self.input(data, kind=kind)
        subject = next((s for s in parent.subjects if s["name"] == d.name), None)
        if subject is not None:
            want = identity_value(subject, d.algorithm)
            if want is None:  # pinned under another algorithm: re-hash it that way
                require_digests(parent, [d.name], root=self.root, purpose=f"record stage {self.stage}")
            elif want != d.digest:
                raise UnverifiedManifestError(
                    f"stage {self.stage}: {d.name} is {d.algorithm}:{d.digest[:16]}… but its upstream manifest "
                    f"{parent.path} pins {want[:16]}…; refusing to record stage {self.stage} -- {FIX_DIGESTS}",
                    (f"{d.name}: DigestMismatchError: {d.algorithm} {d.digest}, {parent.path} pins {want}",),
                )
        return d

    def output(self, path: str | os.PathLike[str]) -> None:
        """Declare a file or directory this stage produced (a subject of the manifest)."""
        name = to_name(path, self.root)
        if name in self._outputs:
            raise DuplicateSubjectError(f"stage {self.stage}: output {name!r} declared twice")
        self._outputs.append(name)

    def byproduct(self, path: str | os.PathLike[str]) -> None:
        """Declare a report/metrics file (pinned in runDetails.byproducts, not a subject)."""
        self._byproducts.append(to_name(path, self.root))

    def note(self, name: str, **annotations: Any) -> None:
        """Attach a small JSON-able byproduct (e.g. the tracker's run id) to run metadata."""
        self._extra_byproducts.append(note_descriptor(name, annotations))

    def _digest_all(self, names: list[str]) -> list[ArtifactDigest]:
        results = self.hasher.digest_all(names)
        out: list[ArtifactDigest] = []
        for name in names:
            r = results[name]
            if isinstance(r, FlowpinError):
                # keep the named error (PathError, ArtifactMissingError...) so callers can tell them apart
                raise type(r)(f"stage {self.stage}: cannot pin {name}: {r}") from r
            out.append(r)
        return out


@contextlib.contextmanager
def record(
    stage: str,
    *,
    recipe: Any,
    overrides: Sequence[str] = (),
    config_files: Sequence[str | os.PathLike[str]] = (),
    code: Sequence[str | os.PathLike[str]] | None = None,
    root: Path | None = None,
    manifest: str | os.PathLike[str] | None = None,
    signer: Signer | None = None,
    algorithm: str | None = None,
    publish: Sequence[str] = (),
    entry_point: EntryPoint | None = None,
    hash_workers: int = 1,
) -> Iterator[StageRecorder]:
    """Record one stage run; see the module docstring.

    ``recipe`` is the stage's typed config (a dataclass) or a plain mapping; ``code`` defaults to the
    stage's code deps in ``dvc.yaml`` (:func:`flowpin.dvcfile.dvc_code_deps`), or, for a stage not in ``dvc.yaml``,
    the running script and the ``src/flowpin`` sources. ``publish`` names the fields of
    :func:`~flowpin.environment.run_context` the manifest publishes (:data:`RUN_CONTEXT_FIELDS`; the recipe's
    ``provenance.run_context``): none by default, so a manifest holds no host, user or absolute path.
    ``entry_point`` (the script and primary Hydra config that ran: :func:`stage_entry_point`) is what
    ``flowpin rebuild`` and ``flowpin fork`` re-run; a manifest recorded without one cannot be re-run by them.
    ``hash_workers`` is the caller's choice of hashing processes (:mod:`flowpin.hashing.pool`): 1, in this
    process, suits a stage that has torch loaded; a stage that only moves data may pass
    :func:`~flowpin.hashing.parallel_workers`.
    """
    unknown = sorted(set(publish) - set(RUN_CONTEXT_FIELDS))
    if unknown:
        raise RecipeError(
            f"provenance.run_context: unknown field(s) {unknown}; choose from {list(RUN_CONTEXT_FIELDS)} "
            "(params/common/provenance.yaml)"
        )
    root = root or find_root()
    # checked before the old manifest is removed: a path outside the repository is never touched
    manifest_name = check_output_path(
        os.fspath(manifest) if manifest is not None else f"{MANIFEST_DIR}/{stage}.json", root, what="paths.manifest"
    )
    signer = signer or load_signer(root)  # fail before any work when no key is available
    algorithm = algorithm or Settings.from_env().digest_algorithm or DEFAULT_ALGORITHM
    manifest_path = root / manifest_name
    manifest_path.unlink(missing_ok=True)
    started, t0 = _now(), time.monotonic()
    # A bar for long hashing (large outputs), on a terminal only: it only displays, so, like the rest of the
    # recording machinery, it is no code dep of the stages (imported here, not with the stage's modules).
    from flowpin.progress import hash_progress

    bars = contextlib.ExitStack()
    cache = default_cache(root)
    try:
        hook = bars.enter_context(hash_progress(f"{stage}: hashing"))
        hasher = Hasher(root, algorithm, cache=cache, workers=hash_workers, progress=hook)
        rec = StageRecorder(stage, root, hasher)
        for path in config_files:
            rec.input(path, kind="config")
        if code is None:
            code = dvc_code_deps(root, stage)
        if code is None:
            code = [p for p in (_main_script(root), root / "src" / "flowpin") if p is not None and p.exists()]
        for path in code:
            rec.code(path)
        yield rec
        # After the body: the numerics settings it ran with (threads, deterministic flags it set).
        t_env = time.monotonic()
        environment = fingerprint(root)
        fingerprint_seconds = time.monotonic() - t_env
        subjects = rec._digest_all(rec._outputs)
        byproducts = [descriptor(d) for d in rec._digest_all(rec._byproducts)]
    finally:
        bars.close()
        cache.close()
    if not subjects:
        raise ManifestError(f"stage {stage}: declared no outputs; call rec.output(...) for what it produced")
    stats = rec.hasher.stats
    published = {k: v for k, v in run_context().items() if k in publish}
    context = {
        **published,
        "durationSeconds": round(time.monotonic() - t0, 3),
        # What pinning cost inside this run (the rest is the stage's own work):
        "hashingSeconds": round(stats.seconds, 3),
        "hashedFiles": stats.files,
        "hashedBytes": stats.bytes_read,
        "statCacheHits": stats.cache_hits,
        "fingerprintSeconds": round(fingerprint_seconds, 3),
    }
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [descriptor(d) for d in subjects],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "stage": stage,
                    "recipe": to_plain(recipe),
                    "overrides": list(overrides),
                    **({} if entry_point is None else {"entryPoint": entry_point.as_json()}),
                },
                "internalParameters": {
                    "manifestVersion": MANIFEST_VERSION,
                    "digestAlgorithm": algorithm,
                    "environment": environment,
                },
                "resolvedDependencies": list(rec._deps.values()),
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"flowpin": __version__}},
                "metadata": {"invocationId": str(uuid.uuid4()), "startedOn": started, "finishedOn": _now()},
                "byproducts": [
                    *byproducts,
                    note_descriptor("run-context", context),
                    *rec._extra_byproducts,
                ],
            },
        },
    }
    failpoint("manifest.before-write", str(manifest_path))
    write_manifest(manifest_path, statement, signer)


__all__ = ["StageRecorder", "descriptor", "entry_script", "record", "stage_entry_point"]
