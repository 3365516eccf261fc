"""``flowpin rebuild``: re-run a recorded stage in a scratch workspace and compare what it produces.

A manifest pins a stage's entry point (script, primary config), recipe and overrides, its code and config
files, its inputs and the environment it ran in. Only a manifest signed by a trusted key is rebuilt
(:func:`~flowpin.manifest.trust.load_verified`, before anything runs). :func:`rebuild_manifest`
re-executes the stage from exactly those pins, away from the project, and compares every subject
digest of the rebuild with the manifest's:

* **Workspace** (a fresh temporary directory, or ``workdir``; never inside the project)::

      <ws>/dvc.yaml               only this stage, its deps = the code deps the manifest pins
      <ws>/params/ stages/ src/   the checkout's, with every pinned code/config file at its pinned bytes
      <ws>/pyproject.toml
      <ws>/manifests/<parent>.json  parent manifests whose outputs digest is the one pinned
      <ws>/<inputs>               each pinned dataset/checkpoint/tokenizer: exactly the files the manifest
                                  lists (extra files in the project are left out), copied, then re-hashed
      <ws>/.flowpin/keys/         a throwaway signing key (trusted in <ws>/keys/); only digests are compared
      <ws>/keys/                  also the project's trusted keys: the stage verifies its parent manifests
      <ws>/rebuild.log            the stage's stdout and stderr

  Outputs of the project (persistent training checkpoints included) are never copied: a training stage
  starts from scratch, which is the point. Nothing in the project is written (not its outputs,
  manifests, ``dvc.lock``, DVC cache or stat cache).
* **Pinned code and config.** Each pinned file is taken from the checkout when its digest matches;
  otherwise from git (the commit the manifest records, then any commit that touched the path, read-only
  through ``git log``/``git cat-file``). A file found in neither is *drift*: :class:`CodeDriftError`
  (exit 2), unless ``allow_code_drift``, in which case the checkout's file is used and reported as a
  cause in the verdict. Modules outside the stage's code deps (the recording machinery) come from the
  checkout; ``dvc.yaml``'s deps for the stage are what decide that, and the manifest pins them.
* **Inputs.** A pinned input that is missing or differs raises :class:`PinnedInputError` (an
  :class:`~flowpin.errors.IntegrityError`) before anything runs: restore it with ``dvc checkout`` or
  ``dvc pull``. File sets outside the repository (``python-stdlib:``, ``python-package:``) are checked
  in place on this machine.
* **Run.** ``<sys.executable> <script> --config-name <configName> <pinned overrides…>``, the entry point the
  manifest records (``externalParameters.entryPoint``; never guessed from the pinned files: one recorded
  without it is refused with :class:`~flowpin.errors.MissingEntryPointError`, one naming a script or primary
  config it does not pin with :class:`~flowpin.errors.EntryPointError`; :func:`rebuild_command`), from
  the workspace root, with ``PYTHONPATH=<ws>/src`` (checked: the workspace's flowpin is what runs) and
  ``FLOWPIN_ROOT=<ws>``. The environment variables the fingerprint tracks are replayed as pinned (set
  when pinned, unset when not), so thread counts and ``FLOWPIN_DIGEST_ALGORITHM`` match the original run.
* **Compare.** Every subject digest (per file inside directories, so the verdict names the files), then
  the build definitions (:func:`flowpin.manifest.diff.diff_manifests`): recipe, overrides, inputs and the
  environment fingerprint (with the keys that can change numerics marked). Those are the differences
  that could explain different outputs. The git state is left out: a scratch workspace is not a
  checkout, and the code it ran is pinned file by file instead.

The verdict is *identical* when every subject the manifest pins was rebuilt with the same digest and the
rebuild produced no other subject. ``exit_status``: 0 every rebuild identical, 1 some differ, 2 some
could not be rebuilt (a :class:`~flowpin.errors.FlowpinError`: missing input, drift, failed stage).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flowpin.constants import MANIFEST_DIR
from flowpin.display import safe, safe_lines
from flowpin.dvcfile import flow_stage, write_flow
from flowpin.environment import numerics_env_vars as tracked_env_vars
from flowpin.errors import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_OK,
    CodeDriftError,
    FlowpinError,
    ManifestError,
    PinnedInputError,
    RebuildError,
)
from flowpin.hashing import ArtifactDigest, Hasher, hash_bytes, hash_file
from flowpin.manifest.diff import diff_manifests
from flowpin.manifest.resolve import fileset_base
from flowpin.manifest.statement import (
    Manifest,
    entry_files,
    entry_kind,
    entry_type,
    load_manifest,
    parse_manifest_bytes,
)
from flowpin.manifest.trust import identity_digests, load_verified
from flowpin.manifest.trust import pinned as pinned_digest
from flowpin.paths import check_name, resolve_inside
from flowpin.signing import TRUST_DIR, init_key

WORKSPACE_MARKER = ".flowpin-rebuild"
"""File that marks a directory as a rebuild workspace (a kept one may be reused, i.e. wiped)."""
LOG_NAME = "rebuild.log"
LOG_TAIL_LINES = 25
_PROJECT_TREES = ("src", "stages", "params")
_PROJECT_FILES = ("pyproject.toml",)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
_SOURCED_KINDS = ("code", "config")
_CONFIG_DIR = "params"
"""Where a rebuilt stage composes its recipe from (one of ``_PROJECT_TREES``: the stage scripts' config path)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RebuildOptions:
    """How to rebuild (the CLI's flags)."""

    workdir: Path | None = None
    """Build here instead of a fresh temporary directory (and keep it). With several manifests, one
    subdirectory per stage. Must be outside the project, and empty or an earlier rebuild workspace."""
    keep: bool = False
    """Keep the temporary workspace (its path is in the result)."""
    allow_code_drift: bool = False
    """Rebuild with the checkout's file where pinned code/config cannot be found; reported as a cause."""
    hash_workers: int = 1
    """Processes that hash the pinned inputs (:mod:`flowpin.hashing.pool`); ``flowpin rebuild`` passes
    :func:`~flowpin.hashing.pool.parallel_workers`, a library caller with torch loaded keeps ``1``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubjectDifference:
    """One subject whose rebuilt digest differs from the manifest's (or exists on one side only)."""

    name: str
    pinned: str | None
    """``algorithm:hex`` the manifest pins; None when only the rebuild produced this subject."""
    rebuilt: str | None
    """``algorithm:hex`` of the rebuild; None when the rebuild did not produce it."""
    changed: tuple[str, ...] = ()
    """Files inside a directory subject whose digest differs."""
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.rebuilt is None:
            return f"{self.name} (not produced by the rebuild)"
        if self.pinned is None:
            return f"{self.name} (produced by the rebuild, not pinned by the manifest)"
        parts = [_listing(self.changed)] if self.changed else []
        parts += [
            f"{label}: {_listing(paths)}"
            for label, paths in (("added", self.added), ("removed", self.removed))
            if paths
        ]
        return f"{self.name} ({'; '.join(parts)})" if parts else self.name

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cause:
    """A recorded difference between the original run and the rebuild that could explain other bytes."""

    section: str
    """recipe | overrides | input | environment | format | stage"""
    key: str
    pinned: Any
    rebuilt: Any
    note: str = ""

    def describe(self) -> str:
        note = f"  ({self.note})" if self.note else ""
        return f"[{self.section}] {self.key}: {_short(self.pinned)} → {_short(self.rebuilt)}{note}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RebuildResult:
    """What one rebuild found (or the error that stopped it, for :func:`rebuild_many`)."""

    manifest: str
    stage: str | None = None
    subjects: int = 0
    files: int = 0
    """Files inside the pinned subjects (directories count their files, a file counts one)."""
    differences: list[SubjectDifference] = dataclasses.field(default_factory=list)
    causes: list[Cause] = dataclasses.field(default_factory=list)
    code_sources: dict[str, int] = dataclasses.field(default_factory=dict)
    """Where the pinned code/config came from: ``checkout``, ``git <commit>``, ``checkout (drift)``."""
    command: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: float = 0.0
    workdir: Path | None = None
    """The workspace, when kept."""
    error: FlowpinError | None = None

    @property
    def identical(self) -> bool:
        return self.error is None and not self.differences

    @property
    def verdict(self) -> str:
        return "error" if self.error is not None else ("identical" if self.identical else "differs")

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "stage": self.stage,
            "verdict": self.verdict,
            "subjects": self.subjects,
            "files": self.files,
            "differences": [d.as_dict() for d in self.differences],
            "causes": [c.as_dict() for c in self.causes],
            "codeSources": self.code_sources,
            "command": self.command,
            "seconds": round(self.seconds, 3),
            "stageSeconds": round(self.stage_seconds, 3),
            "workdir": None if self.workdir is None else str(self.workdir),
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
        }


# --- selecting and ordering manifests -------------------------------------------------------------


def flow_manifests(root: Path) -> list[Path]:
    """The flow's stage manifests: ``manifests/*.json`` (variants in subdirectories are not the flow)."""
    base = root / MANIFEST_DIR
    return sorted(p for p in base.glob("*.json") if p.is_file()) if base.is_dir() else []


def dependency_order(manifests: Sequence[Manifest], root: Path) -> list[Manifest]:
    """``manifests`` with every parent before its children (ties by path), as lineage links them."""
    by_name = {_name_in(m.path, root): m for m in manifests}
    parents = {name: {d["name"] for d in m.parents} & by_name.keys() for name, m in by_name.items()}
    ordered: list[Manifest] = []
    done: set[str] = set()
    while len(done) < len(by_name):
        ready = sorted(n for n in by_name if n not in done and parents[n] <= done)
        if not ready:
            cycle = sorted(n for n in by_name if n not in done)
            raise ManifestError(f"parent manifests form a cycle among {', '.join(cycle)}; flowpin lineage shows it")
        for name in ready:
            ordered.append(by_name[name])
            done.add(name)
    return ordered


def _name_in(path: Path, root: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


# --- the rebuild ----------------------------------------------------------------------------------


def rebuild_many(
    paths: Sequence[Path],
    *,
    root: Path,
    options: RebuildOptions = RebuildOptions(),
    stages: Sequence[str] = (),
) -> Iterator[RebuildResult]:
    """Rebuild each manifest (parents first, then by path), independently, each from the project's pins.

    ``stages`` keeps only those stages. A :class:`FlowpinError` stops only its own stage: it is in that
    stage's result (a manifest that cannot be read is reported first).
    """
    loaded: list[Manifest] = []
    unreadable: list[RebuildResult] = []
    for path in paths:
        try:
            loaded.append(load_manifest(path))
        except FlowpinError as exc:
            unreadable.append(RebuildResult(manifest=_name_in(path, root), error=exc))
    if stages:
        unknown = sorted(set(stages) - {m.stage for m in loaded})
        if unknown:
            raise RebuildError(
                f"no manifest for stage {', '.join(unknown)} among the {len(loaded)} given; "
                "check the name (flowpin show MANIFEST prints a manifest's stage)"
            )
        loaded = [m for m in loaded if m.stage in stages]
    yield from unreadable
    ordered = dependency_order(loaded, root)
    for m in ordered:
        opts = options
        if options.workdir is not None and len(ordered) > 1:
            opts = dataclasses.replace(options, workdir=options.workdir / m.stage)
        t0 = time.monotonic()
        try:
            yield rebuild_manifest(m.path, root=root, options=opts)
        except FlowpinError as exc:
            yield RebuildResult(
                manifest=_name_in(m.path, root), stage=m.stage, seconds=time.monotonic() - t0, error=exc
            )


def rebuild_manifest(path: Path, *, root: Path, options: RebuildOptions = RebuildOptions()) -> RebuildResult:
    """Rebuild the stage ``path`` pins in a scratch workspace and compare its subjects; see the module."""
    t0 = time.monotonic()
    # Signed by a trusted key before anything runs; the digests it relies on (code, config, inputs, parents)
    # are re-hashed as the workspace is filled (_populate), its outputs are what the rebuild compares.
    original = load_verified(path, root=root, check="signature", purpose="rebuild it")
    result = RebuildResult(
        manifest=_name_in(path, root),
        stage=original.stage,
        subjects=len(original.subjects),
        files=sum(max(1, len(entry_files(s))) for s in original.subjects),
    )
    result.command = rebuild_command(original, root)
    workspace, temporary = _open_workspace(root, options, original.stage)
    keep = options.keep or not temporary
    try:
        drifted = _populate(
            workspace, original, root, result, allow_drift=options.allow_code_drift, hash_workers=options.hash_workers
        )
        rebuilt_path = workspace / _manifest_name(original)
        t_stage = time.monotonic()
        _run_stage(workspace, [sys.executable, *result.command[1:]], _replayed_env(original, workspace))
        result.stage_seconds = time.monotonic() - t_stage
        rebuilt = _load_rebuilt(rebuilt_path, workspace)
        result.differences = subject_differences(original.subjects, rebuilt.subjects)
        result.causes = build_causes(original, rebuilt, drifted)
    except FlowpinError as exc:
        if keep:  # say where to look (every FlowpinError subclass takes a message alone)
            raise type(exc)(f"{exc}\n  workspace kept: {workspace}") from exc
        raise
    finally:
        if keep:
            result.workdir = workspace
        else:
            shutil.rmtree(workspace, ignore_errors=True)
    result.seconds = time.monotonic() - t0
    return result


def exit_status(results: Iterable[RebuildResult]) -> int:
    """0 every rebuild identical, 1 some differ (none failed), 2 some could not be rebuilt (the exit codes of
    :mod:`flowpin.errors`: a stage that could not be rebuilt is an input error, as if it had been raised)."""
    results = list(results)
    if any(r.error is not None for r in results):
        return EXIT_INPUT
    return EXIT_OK if all(r.identical for r in results) else EXIT_FAILED


def render_totals(results: Sequence[RebuildResult], seconds: float) -> str:
    """``flowpin rebuild``'s last line: how many stages were identical, differ, or could not be rebuilt."""
    counts = {v: sum(r.verdict == v for r in results) for v in ("identical", "differs", "error")}
    return (
        f"rebuild: {counts['identical']} identical, {counts['differs']} differ, {counts['error']} could not be "
        f"rebuilt ({seconds:.1f} s)"
    )


def render_json(results: Sequence[RebuildResult]) -> str:
    """``flowpin rebuild --json``: one object per stage."""
    return json.dumps([r.as_dict() for r in results], indent=2, sort_keys=True)


# --- what the manifest says to run ----------------------------------------------------------------


def rebuild_command(m: Manifest, root: Path) -> list[str]:
    """``python <script> --config-name <config> <overrides>``: the entry point ``m`` records, run as recorded.

    Refused (named errors, before any workspace exists): a manifest without an entry point
    (:class:`~flowpin.errors.MissingEntryPointError`), one whose script or primary config is not among the
    code/config files it pins or lies outside the repository (:class:`~flowpin.errors.EntryPointError`: what
    would run is not what was pinned), a config directory other than the workspace's ``params/``, and a
    ``flowpin fork`` record (its ``fork`` note: a fork continues a checkpoint; re-run it with ``flowpin fork``).
    """
    entry = m.require_entry_point(root=root, purpose="rebuild it")
    fork = m.note("fork")
    if fork is not None:
        again = fork.get("command") or ["flowpin", "fork", str(fork.get("parent")), "--step", str(fork.get("step"))]
        raise RebuildError(
            f"{m.path}: records a `flowpin fork` of {fork.get('parent')} at step {fork.get('step')}, which "
            f"continues a checkpoint rather than running {entry.script} from scratch; re-run it with: "
            f"{shlex.join(map(str, again))}"
        )
    if entry.config_dir != _CONFIG_DIR:
        raise RebuildError(
            f"{m.path}: entryPoint.configDir is {entry.config_dir!r}; a rebuild workspace composes recipes from "
            f"{_CONFIG_DIR}/ only -- re-run the stage with its recipe under {_CONFIG_DIR}/"
        )
    return entry.command(m.overrides)


def _manifest_name(m: Manifest) -> str:
    """Where the stage writes its manifest: ``paths.manifest`` of the pinned recipe."""
    name = m.paths.get("manifest")
    return check_name(name) if isinstance(name, str) else f"{MANIFEST_DIR}/{m.stage}.json"


# --- the workspace --------------------------------------------------------------------------------


def _open_workspace(root: Path, options: RebuildOptions, stage: str) -> tuple[Path, bool]:
    """(workspace, temporary?): a fresh temp dir, or ``options.workdir`` made empty."""
    real_root = root.resolve()
    if options.workdir is None:
        base = Path(tempfile.gettempdir()).resolve()
        if base == real_root or real_root in base.parents:
            raise RebuildError(f"the temporary directory {base} is inside the project; set TMPDIR or pass --workdir")
        ws = Path(tempfile.mkdtemp(prefix=f"flowpin-rebuild-{stage}-")).resolve()
        (ws / WORKSPACE_MARKER).touch()
        return ws, True
    ws = options.workdir.resolve()
    if ws == real_root or real_root in ws.parents or ws in real_root.parents:
        raise RebuildError(f"--workdir {ws} overlaps the project {real_root}; choose a directory outside it")
    if ws.exists():
        if not ws.is_dir():
            raise RebuildError(f"--workdir {ws} is not a directory; name an empty or new directory")
        if any(ws.iterdir()):
            if not (ws / WORKSPACE_MARKER).is_file():
                raise RebuildError(
                    f"--workdir {ws} is not empty and not an earlier rebuild workspace; name an empty or new directory"
                )
            shutil.rmtree(ws)
    ws.mkdir(parents=True, exist_ok=True)
    (ws / WORKSPACE_MARKER).touch()
    return ws, False


def _populate(
    ws: Path, m: Manifest, root: Path, result: RebuildResult, *, allow_drift: bool, hash_workers: int
) -> dict[str, str]:
    """Fill the workspace; returns the drifted code/config names → the digest of the file used instead."""
    for tree in _PROJECT_TREES:
        if (root / tree).is_dir():
            shutil.copytree(root / tree, ws / tree, ignore=_IGNORE, symlinks=False)
    for name in _PROJECT_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, ws / name)
    (ws / ".dvc").mkdir(exist_ok=True)
    for sub in (MANIFEST_DIR, "reports"):
        (ws / sub).mkdir(exist_ok=True)
    drifted = _source_code(ws, m, root, result, allow_drift=allow_drift)
    _write_dvc_yaml(ws, m, root, result.command)
    _copy_parents(ws, m, root)
    _copy_inputs(ws, m, root, hash_workers=hash_workers)
    _check_external_filesets(m, root, hash_workers=hash_workers)
    _copy_trust_store(ws, root)
    init_key(ws, key_path=ws / ".flowpin" / "keys" / "signing.key")
    return drifted


def _copy_trust_store(ws: Path, root: Path) -> None:
    """The project's trusted public keys: the rebuilt stage verifies the parent manifests copied beside it."""
    (ws / TRUST_DIR).mkdir(parents=True, exist_ok=True)
    for pub in sorted((root / TRUST_DIR).glob("*.pub")):
        if pub.is_file():
            shutil.copyfile(pub, ws / TRUST_DIR / pub.name)


def _identity(entry: dict[str, Any], algorithm: str) -> str | None:
    try:
        return pinned_digest(entry, algorithm)[1]
    except ManifestError:
        return None


def _pinned_files(dep: dict[str, Any], algorithm: str) -> list[tuple[str, str]]:
    """(repository name, pinned digest) of every file a code/config dependency pins."""
    digest = _identity(dep, algorithm)
    if digest is None:
        raise ManifestError(f"{dep['name']}: no {algorithm} digest pinned; the manifest is inconsistent")
    if entry_type(dep) == "file":
        return [(dep["name"], digest)]
    return [(f"{dep['name']}/{rel}", d) for rel, d in sorted(entry_files(dep).items())]


def pinned_code(m: Manifest) -> dict[str, str]:
    """Repository name → pinned digest of every code and config file ``m`` pins."""
    out: dict[str, str] = {}
    for dep in m.dependencies_of(*_SOURCED_KINDS):
        if "uri" not in dep:
            out.update(_pinned_files(dep, m.algorithm))
    return out


def _source_code(ws: Path, m: Manifest, root: Path, result: RebuildResult, *, allow_drift: bool) -> dict[str, str]:
    """Put every pinned code/config file into the workspace at its pinned bytes; see the module docstring.

    Returns the drifted names (used from the checkout under ``allow_drift``) → the digest actually used.
    """
    algorithm = m.algorithm
    git = GitHistory(root)
    commit = m.git.get("commit")
    drifted: dict[str, str] = {}
    problems: list[str] = []
    sources: dict[str, int] = {}
    for name, pinned in pinned_code(m).items():
        local = resolve_inside(name, root)
        have = hash_file(local, algorithm) if local.is_file() else None
        origin = "checkout"
        if have != pinned:
            found = git.find(name, commit, _has_digest(algorithm, pinned))
            if found is not None:
                origin = f"git {found[0][:12]}"
                target = ws / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(found[1])
            elif have is None:
                origin = "missing"
                problems.append(f"{name} (pinned {pinned[:16]}…, absent from the checkout)")
            else:
                origin = "checkout (drift)"
                drifted[name] = f"{algorithm}:{have}"
                if not allow_drift:
                    problems.append(f"{name} (pinned {pinned[:16]}…, checkout {have[:16]}…)")
        sources[origin] = sources.get(origin, 0) + 1
    result.code_sources = sources
    if problems:
        fix = (
            "check out the commit that recorded the manifest"
            if "missing" in sources
            else "check out the commit that recorded the manifest, or pass --allow-code-drift to rebuild with the "
            "checkout's files and see what changes"
        )
        raise CodeDriftError(
            f"{m.path}: {len(problems)} pinned code/config file(s) are neither in the checkout nor in git history at "
            f"their pinned digest: {'; '.join(problems[:8])}{' …' if len(problems) > 8 else ''}; {fix}"
        )
    return drifted


def _has_digest(algorithm: str, digest: str) -> Callable[[bytes], bool]:
    return lambda data: hash_bytes(data, algorithm) == digest


def _write_dvc_yaml(ws: Path, m: Manifest, root: Path, command: list[str]) -> None:
    """A ``dvc.yaml`` with only this stage, whose code deps are exactly those the manifest pins.

    The stage learns from ``dvc.yaml`` which code to pin (and, for a script serving several stages,
    which stage it is); a stage that was recorded without a ``dvc.yaml`` entry gets none here either.
    """
    stages: dict[str, Any] = {}
    if flow_stage(root, m.stage) is not None:
        stages[m.stage] = {"cmd": shlex.join(command), "deps": m.dependency_names("code")}
    write_flow(ws, stages)


def _copy_parents(ws: Path, m: Manifest, root: Path) -> None:
    """Each parent manifest at the outputs digest the child pinned (checkout first, then git history)."""
    git = GitHistory(root)
    for dep in m.parents:
        name = check_name(dep["name"])
        algorithm, want = pinned_digest(dep)

        def matches(data: bytes, where: str = name, algo: str = algorithm, want: str = want) -> bool:
            try:
                envelope, statement = parse_manifest_bytes(data, where)
            except FlowpinError:
                return False
            return Manifest(path=Path(where), envelope=envelope, statement=statement).outputs_digest(algo) == want

        local = resolve_inside(name, root)
        data = local.read_bytes() if local.is_file() else None
        if data is None or not matches(data):
            found = git.find(name, None, matches)
            if found is None:
                state = "is missing" if data is None else "records other outputs"
                raise PinnedInputError(
                    f"{m.path}: parent manifest {name} {state} (pinned outputs {algorithm}:{want[:16]}…) and no git "
                    f"version matches; restore it (git checkout -- {name}) or re-run the upstream stage"
                )
            data = found[1]
        target = ws / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _copy_inputs(ws: Path, m: Manifest, root: Path, *, hash_workers: int) -> None:
    """Copy each pinned repository input (only the files it pins) and check the copies' digests."""
    entries = [
        d
        for d in m.dependencies
        if entry_kind(d) not in (*_SOURCED_KINDS, "manifest") and not (entry_type(d) == "fileset" and "uri" in d)
    ]
    problems: list[str] = []
    for dep in entries:
        name = check_name(dep["name"])
        rels = [f"{name}/{rel}" for rel in entry_files(dep)] if entry_type(dep) != "file" else [name]
        absent: list[str] = []
        for rel in rels:
            source = resolve_inside(rel, root)
            if not source.is_file():
                absent.append(rel)
                continue
            target = ws / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        if absent:
            shown = ", ".join(absent[:5]) + (f" (+{len(absent) - 5} more)" if len(absent) > 5 else "")
            problems.append(f"{name}: missing {shown}")
    hasher = Hasher(ws, m.algorithm, cache=None, workers=hash_workers)  # the stat cache is no evidence
    by_name = {d["name"]: d for d in entries}
    results = hasher.digest_all(list(by_name))
    for name, dep in by_name.items():
        if any(p.startswith(f"{name}: missing") for p in problems):
            continue
        actual = results[name]
        problem = _input_problem(dep, actual, m.algorithm)
        if problem:
            problems.append(f"{name}: {problem}")
    if problems:
        raise PinnedInputError(
            f"{m.path}: {len(problems)} pinned input(s) differ from the project's files: {'; '.join(problems)}; "
            "restore them (dvc checkout, or dvc pull when the local cache lacks them) or re-run the upstream stage"
        )


def _input_problem(dep: dict[str, Any], actual: ArtifactDigest | FlowpinError, algorithm: str) -> str:
    if isinstance(actual, FlowpinError):
        return f"{type(actual).__name__}: {actual}"
    expected = _identity(dep, algorithm)
    if expected == actual.digest:
        return ""
    old = entry_files(dep)
    new = {f.path: f.digest for f in actual.files}
    changed = sorted(p for p in old.keys() & new.keys() if old[p] != new[p])
    shown = ", ".join(changed[:5]) + (f" (+{len(changed) - 5} more)" if len(changed) > 5 else "")
    changes = f" (changed: {shown})" if shown else ""
    return f"{algorithm} {actual.digest[:16]}…, pinned {str(expected)[:16]}…{changes}"


def _check_external_filesets(m: Manifest, root: Path, *, hash_workers: int) -> None:
    """File sets outside the repository (the stdlib, installed packages): the stage reads them in place."""
    problems: list[str] = []
    for dep in m.dependencies:
        if entry_type(dep) != "fileset" or "uri" not in dep:
            continue
        try:
            base = fileset_base(dep, root)
            hasher = Hasher(root, m.algorithm, cache=None, workers=hash_workers)  # no stat cache: see above
            actual: ArtifactDigest | FlowpinError = hasher.digest_fileset(dep["name"], base, list(entry_files(dep)))
        except FlowpinError as exc:
            actual = exc
        problem = _input_problem(dep, actual, m.algorithm)
        if problem:
            problems.append(f"{dep['name']} ({dep['uri']}): {problem}")
    if problems:
        raise PinnedInputError(
            f"{m.path}: pinned file set(s) outside the repository differ on this machine: {'; '.join(problems)}; "
            "rebuild with the interpreter and packages the manifest names"
        )


# --- running the stage ----------------------------------------------------------------------------


def _replayed_env(m: Manifest, ws: Path) -> dict[str, str]:
    """This process's environment with the fingerprinted variables as the manifest pins them."""
    pinned: dict[str, str] = dict(m.environment.get("envVars") or {})
    tracked = tracked_env_vars(os.environ)  # what the fingerprint would record of this process's environment
    env = {k: v for k, v in os.environ.items() if k not in tracked or k in pinned}
    env.update(pinned)
    env.pop("FLOWPIN_SIGNING_KEY", None)
    python_path = [str(ws / "src"), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env.update(
        PYTHONPATH=os.pathsep.join(python_path),
        FLOWPIN_ROOT=str(ws),
        FLOWPIN_SIGNING_KEY=str(ws / ".flowpin" / "keys" / "signing.key"),
        DVC_NO_ANALYTICS="1",
    )
    return env


def _run_stage(ws: Path, command: list[str], env: dict[str, str]) -> None:
    probe = subprocess.run(
        [command[0], "-c", "import flowpin, sys; sys.stdout.write(flowpin.__file__)"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    package = ws / "src" / "flowpin"
    if probe.returncode != 0 or Path(probe.stdout).resolve().parent != package.resolve():
        raise RebuildError(
            f"the workspace's flowpin ({package}) is not what {command[0]} imports "
            f"({probe.stdout.strip() or probe.stderr.strip()[-300:]}); the rebuild would not run the pinned code"
        )
    log = ws / LOG_NAME
    with log.open("wb") as fh:
        fh.write(f"$ {shlex.join(command)}\n".encode())
        fh.flush()
        proc = subprocess.run(command, cwd=ws, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text("utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise RebuildError(
            f"the stage exited with status {proc.returncode} in the rebuild workspace; last lines of its log:\n  "
            + "\n  ".join(tail)
        )


def _load_rebuilt(path: Path, ws: Path) -> Manifest:
    if not path.is_file():
        tail = (ws / LOG_NAME).read_text("utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        raise RebuildError(
            f"the stage succeeded but wrote no manifest at {path.relative_to(ws)}; last lines of its log:\n  "
            + "\n  ".join(tail)
        )
    return load_manifest(path)


# --- comparing ------------------------------------------------------------------------------------


def subject_differences(pinned: list[dict[str, Any]], rebuilt: list[dict[str, Any]]) -> list[SubjectDifference]:
    """Every subject whose digest differs, with the files inside that differ; sorted by name."""
    old = {s["name"]: s for s in pinned}
    new = {s["name"]: s for s in rebuilt}
    out: list[SubjectDifference] = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is not None and b is not None and identity_digests(a) == identity_digests(b):
            continue
        fa = entry_files(a) if a else {}
        fb = entry_files(b) if b else {}
        both = a is not None and b is not None
        out.append(
            SubjectDifference(
                name=name,
                pinned=_digest(a),
                rebuilt=_digest(b),
                changed=tuple(sorted(p for p in fa.keys() & fb.keys() if fa[p] != fb[p])),
                added=tuple(sorted(fb.keys() - fa.keys())) if both else (),
                removed=tuple(sorted(fa.keys() - fb.keys())) if both else (),
            )
        )
    return out


def build_causes(original: Manifest, rebuilt: Manifest, drifted: dict[str, str] | None = None) -> list[Cause]:
    """Differences of the build definitions (recipe, overrides, inputs, environment), git state aside."""
    drifted = drifted or {}
    causes: list[Cause] = []
    for c in diff_manifests(original, rebuilt).changes:
        if c.section in ("output", "code"):  # outputs are the verdict; git state cannot match a scratch copy
            continue
        note = c.note
        if c.section == "input" and c.key in drifted:
            note = "code drift: the checkout's file was used (--allow-code-drift)"
        causes.append(Cause(section=c.section, key=c.key, pinned=c.old, rebuilt=c.new, note=note))
    for name in sorted(drifted):
        if not any(c.section == "input" and c.key == name for c in causes):  # a file inside a pinned directory
            causes.append(
                Cause(
                    section="input",
                    key=name,
                    pinned=pinned_code(original).get(name),
                    rebuilt=drifted[name],
                    note="code drift: the checkout's file was used (--allow-code-drift)",
                )
            )
    return causes


def _digest(entry: dict[str, Any] | None) -> str | None:
    if entry is None:
        return None
    try:
        algo, value = pinned_digest(entry)
    except ManifestError:
        return "(no flowpin digest)"
    return f"{algo}:{value}"


def _listing(paths: Sequence[str], limit: int = 8) -> str:
    return ", ".join(paths[:limit]) + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "…"


def render_result(r: RebuildResult) -> str:
    """The verdict of one rebuild as text (see the module docstring); control characters escaped
    (:func:`flowpin.display.safe`): names and recorded values come from the manifest."""
    where = f"[{r.manifest}, {r.seconds:.1f} s" + (f", stage {r.stage_seconds:.1f} s]" if r.stage_seconds else "]")
    if r.error is not None:
        return safe_lines(f"ERROR: {r.stage or '?'}: {type(r.error).__name__}: {r.error}  {where}")
    lines: list[str] = []
    if r.identical:
        lines.append(f"identical: {r.stage} ({r.subjects} subject(s), {r.files} file(s))  {where}")
        if r.causes:
            lines.append("  recorded differences (outputs identical anyway):")
            lines += [f"    {c.describe()}" for c in r.causes]
    else:
        lines += [f"DIFFERS: {r.stage}: {d.describe()}" for d in r.differences]
        lines.append(f"  {len(r.differences)} of {r.subjects} subject(s) differ  {where}")
        if r.causes:
            lines.append("  could explain (recorded differences between the original run and the rebuild):")
            lines += [f"    {c.describe()}" for c in r.causes]
        else:
            lines.append(
                "  nothing the manifest records differs (recipe, inputs, code, environment): the stage depends on "
                "something it does not pin (an unrecorded environment variable, the clock, unseeded randomness)"
            )
    drift = {k: v for k, v in r.code_sources.items() if k != "checkout"}
    if drift:
        lines.append("  pinned code/config from: " + ", ".join(f"{k} ({v})" for k, v in sorted(drift.items())))
    if r.workdir is not None:
        lines.append(f"  workspace kept: {r.workdir}")
    return "\n".join(safe(line) for line in lines)  # one line each: names and values escaped


class GitHistory:
    """Read-only look-ups of earlier versions of a file in the project's git repository."""

    def __init__(self, root: Path, *, max_commits: int = 500) -> None:
        self.root = root
        self.max_commits = max_commits
        self._env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def _git(self, *args: str, stdin: bytes | None = None) -> bytes | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=self.root, input=stdin, capture_output=True, env=self._env, check=False
            )
        except OSError:
            return None
        return proc.stdout if proc.returncode == 0 else None

    def find(self, name: str, commit: str | None, accept: Callable[[bytes], bool]) -> tuple[str, bytes] | None:
        """(commit, content) of the first version of ``name`` that ``accept`` takes: ``commit``'s first,
        then those of the (at most ``max_commits``) latest commits that touched it, on any branch."""
        blobs: dict[str, str] = {}
        if commit:
            out = self._git("rev-parse", "--verify", "-q", f"{commit}:./{name}")
            if out:
                blobs[out.decode().strip()] = commit
        log = self._git(
            "log", "--all", "--no-renames", "--raw", "--no-abbrev", "--format=%H", f"-n{self.max_commits}", "--", name
        )
        current = ""
        for line in (log or b"").decode("utf-8", errors="replace").splitlines():
            if line.startswith(":"):
                fields = line.split("\t", 1)[0].split()
                if len(fields) >= 4:
                    for blob, label in ((fields[3], current), (fields[2], current + "^")):
                        if blob.strip("0"):
                            blobs.setdefault(blob, label)
            elif line.strip():
                current = line.strip()
        if not blobs:
            return None
        out = self._git("cat-file", "--batch", stdin=("\n".join(blobs) + "\n").encode())
        if out is None:
            return None
        pos = 0
        for label in blobs.values():
            end = out.index(b"\n", pos)
            header = out[pos:end].split()
            if len(header) < 3 or header[1] != b"blob":
                pos = end + 1
                continue
            size = int(header[2])
            content = out[end + 1 : end + 1 + size]
            pos = end + 1 + size + 1
            if accept(content):
                return label, content
        return None


__all__ = [
    "Cause",
    "CodeDriftError",
    "GitHistory",
    "PinnedInputError",
    "RebuildError",
    "RebuildOptions",
    "RebuildResult",
    "SubjectDifference",
    "build_causes",
    "dependency_order",
    "exit_status",
    "flow_manifests",
    "pinned_code",
    "rebuild_command",
    "rebuild_manifest",
    "rebuild_many",
    "render_json",
    "render_result",
    "render_totals",
    "subject_differences",
]
