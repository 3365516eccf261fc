"""The shape every stage script shares, in one place.

A stage composes its Hydra recipe, turns the stage's block into its typed config and the ``paths``
block into :class:`~flowpin.recipe.StagePaths`, records a signed manifest (declaring every upstream
input with its parent manifest), builds its output directory aside and swaps it in whole, writes its
JSON report and declares output and report. :func:`stage_run` does all of that around the one library
call that is the stage's own work::

    @hydra.main(config_path="../params", config_name="dedup", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        with stage_run("dedup", cfg, DedupConfig, root=ROOT, inputs=("corpus",)) as run:
            result = run_dedup(run.recipe, run.input_dir("corpus"), run.out_dir)
            run.report = result.report

Nothing is recorded when the recipe is invalid (the previous manifest and outputs stay as they were);
when the body raises, the stage's manifest is gone and its previous outputs are untouched. Every path of
the ``paths`` block is checked first (:func:`check_stage_paths`: inside the repository, no ``..``, no
symlink out, nothing under ``.git/``, ``.dvc/``, ``keys/``): a refused path leaves everything as it was.

**Ranks.** Under ``torchrun`` rank 0 alone records: it opens the tracker, writes the report and the
manifest; the other ranks run the same body with a recorder that is never written and no tracker
(``main``, by default what :func:`flowpin.train.launcher.process_rank` says this process is). A stage whose
output is swapped in whole (not ``persistent_out``) runs as one process and refuses a world of several.

**Tracking.** Every run (rank 0) opens an experiment tracker before it records anything
(:func:`track_stage`: an Aim run in ``<root>/.aim``, or nothing with ``FLOWPIN_TRACKING=off``; one that
cannot be opened fails the stage there). The body gets it as ``run.tracker`` (training stages hand it to
the runner, :func:`flowpin.train.run.run_spec`). The run's params are the stage, the resolved recipe, the
overrides and the git revision; the report is the run's ``report`` param (never metrics); the manifest's
``tracking`` note (run metadata, not identity) names the tracker and the Aim run hash; once the manifest is
written, its digests become the run's ``manifest`` param. See ``docs/tracking.md``.

**Which stage.** ``"dedup"`` above names the recipe block (``cfg.dedup``) and the stage. One script can
serve several DVC stages (``python stages/mix.py --config-name mix_midtrain`` for the stage
``mix_midtrain``): a DVC stage is named after its primary Hydra config, so when ``dvc.yaml`` has a stage
named like the composed config, that is the stage recorded -- the manifest's ``stage`` and the
``dvc.yaml`` entry whose code deps it pins (:func:`stage_name`). Variants run outside DVC
(``--config-name mix_full``) keep the block's name and its entry, as the code is the same.

**The process.** A stage that trains or evaluates a model passes ``environment``: a function of its typed
recipe returning :func:`flowpin.runtime.prepare_environment`'s context (seeds, threads, deterministic
kernels, process group, megatron's CPU patches). It is entered once the recipe and paths are checked, before
the tracker and the recorder open, and left after the manifest is written (whose environment fingerprint
reads the settings in force); the body gets its value as ``run.runtime``.

**Started by flowpin itself.** ``flowpin fork`` records a training stage without Hydra's ``@hydra.main``: it
passes a :class:`StageInvocation` naming the stage, what it composed (primary config, overrides, files), the
entry point that re-runs it and where it writes (the recipe keeps its declared paths, as a sweep job's does);
the run is then recorded exactly as a stage's, tracker and report included, and its errors propagate to
the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from omegaconf import DictConfig

from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.dvcfile import dvc_code_deps
from flowpin.errors import FlowpinError, InternalError, PathError, RecipeError, exit_code
from flowpin.hashing import Hasher, hash_bytes, hash_file
from flowpin.manifest.record import StageRecorder, record, source_files, stage_entry_point
from flowpin.paths import check_output_path
from flowpin.recipe import HydraSources, StagePaths, check_hydra_location, hydra_sources, to_config, to_plain
from flowpin.tracking.aim import StageTracker, open_stage_tracker
from flowpin.tracking.base import NullTracker, Tracker

if TYPE_CHECKING:
    from flowpin.manifest.statement import EntryPoint
    from flowpin.runtime import Runtime
    from flowpin.train.run_key import RunClaim

T = TypeVar("T")


@dataclasses.dataclass
class StageRun(Generic[T]):
    """What the body of :func:`stage_run` works with."""

    recipe: T
    """The stage's typed config."""
    paths: StagePaths
    rec: StageRecorder
    """For extra declarations (e.g. inputs outside the repository: ``rec.fileset``)."""
    out_dir: Path
    """An empty temporary directory that becomes ``paths.out`` when the body succeeds."""
    root: Path
    stage: str
    """The stage recorded (:func:`stage_name`)."""
    report: dict[str, Any] | None = None
    """Set by the body: written (canonical JSON) to ``paths.report`` and pinned as a byproduct."""
    tracker: Tracker = dataclasses.field(default_factory=NullTracker)
    """The run's experiment tracker (write-only metadata: nothing it receives is hashed). Training stages
    pass it to ``run_spec(..., tracker=run.tracker)``; any stage may log more metrics to it."""
    runtime: Runtime | None = None
    """The prepared process (``environment``: :func:`flowpin.runtime.prepare_environment`), if any."""

    def input_dir(self, role: str) -> Path:
        """The upstream dataset directory for ``role`` (``paths.inputs.<role>.data``)."""
        return self.root / self.paths.inputs[role].data

    def code_digests(self) -> dict[str, str] | None:
        """sha256 of each file of the stage's code deps (:func:`stage_code_digests`)."""
        return stage_code_digests(self.root, self.stage)

    def run_claim(self) -> RunClaim:
        """How a training stage claims its run directory (``run_spec(..., claim=run.run_claim())``): the run
        key covers :meth:`code_digests`, and ``FLOWPIN_STALE_CHECKPOINTS`` says what becomes of checkpoints
        trained under another key (:mod:`flowpin.train.run_key`)."""
        from flowpin.train.run_key import RunClaim  # training stages only (it imports torch)

        return RunClaim.from_env(self.code_digests())


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageInvocation:
    """A stage run flowpin starts itself (``flowpin fork``), not Hydra's ``@hydra.main``: what Hydra would say."""

    stage: str
    """The stage recorded (a fork: its parent's)."""
    sources: HydraSources
    """What was composed: primary config name, overrides (all of them, in order), config files."""
    entry_point: EntryPoint | None
    """What ``flowpin rebuild`` and ``flowpin fork`` re-run (a fork: its parent's)."""
    paths: StagePaths
    """Where the run writes and which upstream inputs it declares (run metadata: the recorded recipe keeps its
    own ``paths``)."""
    declare: Callable[[StageRecorder], None] | None = None
    """Declarations made before the upstream inputs (a fork: its parent manifest and the checkpoint)."""


def stage_code_digests(root: Path, stage: str) -> dict[str, str] | None:
    """sha256 of each file of ``stage``'s code deps in ``dvc.yaml`` (what its manifest pins), by repository path.

    The code part of a training stage's run key: an edit elsewhere in flowpin (``cli.py``) leaves a killed
    run's checkpoints resumable, an edit to a module the stage runs does not. ``None`` for a stage without a
    ``dvc.yaml`` entry: the training libraries then cover the whole flowpin package.
    """
    deps = dvc_code_deps(root, stage)
    if deps is None:
        return None
    digests: dict[str, str] = {}
    for dep in deps:
        path = root / dep
        if path.is_dir():
            digests.update({f"{dep}/{rel}": hash_file(path / rel, "sha256") for rel in source_files(path)})
        elif path.is_file():
            digests[dep] = hash_file(path, "sha256")
        else:
            raise RecipeError(f"dvc.yaml: stage {stage}: code dep {dep} does not exist; restore it or fix dvc.yaml")
    return digests


def stage_name(block: str, config_name: str, root: Path) -> str:
    """The stage a run of recipe block ``block`` composed from ``params/<config_name>.yaml`` records.

    ``config_name`` when ``dvc.yaml`` (under ``root``) has a stage of that name, else ``block``: see the
    module docstring. The name keys the ``dvc.yaml`` entry whose code deps the manifest pins.
    """
    if config_name and config_name != block and dvc_code_deps(root, config_name) is not None:
        return config_name
    return block


def published_run_context(cfg: DictConfig) -> tuple[str, ...]:
    """The recipe's ``provenance.run_context``: which run-context fields the manifest publishes."""
    chosen = cfg.get("provenance", {}).get("run_context") or ()
    return tuple(str(f) for f in chosen)


@contextlib.contextmanager
def stage_run(
    block: str,
    cfg: DictConfig,
    config_cls: type[T],
    *,
    root: Path,
    inputs: Sequence[str] = (),
    preflight: Callable[[T, StagePaths], None] | None = None,
    persistent_out: bool = False,
    main: bool | None = None,
    environment: Callable[[T], AbstractContextManager[Runtime]] | None = None,
    invocation: StageInvocation | None = None,
) -> Iterator[StageRun[T]]:
    """Run one stage: see the module docstring and :func:`_stage_run` for the arguments.

    In a single Hydra run (a stage script on the command line, or under ``dvc repro``) a
    :class:`~flowpin.errors.FlowpinError` is reported as ``flowpin: <Error>: <message>`` on stderr, without a
    traceback (the message already names what, where and how to fix it), and the process exits with the
    status :func:`flowpin.errors.exit_code` gives it, as the CLI does (2; 70 for an internal error). Anywhere
    else (sweep jobs, ``flowpin fork``, tests calling this directly) it propagates.
    """
    try:
        with _stage_run(
            block,
            cfg,
            config_cls,
            root=root,
            inputs=inputs,
            preflight=preflight,
            persistent_out=persistent_out,
            main=main,
            environment=environment,
            invocation=invocation,
        ) as run:
            yield run
    except FlowpinError as exc:
        if invocation is not None or not _single_hydra_run():
            raise
        print(f"flowpin: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(exit_code(exc)) from exc


def _single_hydra_run() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


@contextlib.contextmanager
def _stage_run(
    block: str,
    cfg: DictConfig,
    config_cls: type[T],
    *,
    root: Path,
    inputs: Sequence[str] = (),
    preflight: Callable[[T, StagePaths], None] | None = None,
    persistent_out: bool = False,
    main: bool | None = None,
    environment: Callable[[T], AbstractContextManager[Runtime]] | None = None,
    invocation: StageInvocation | None = None,
) -> Iterator[StageRun[T]]:
    """Run one stage: see the module docstring.

    ``block`` is the recipe block (``cfg[block]``, turned into ``config_cls``) and the stage's default
    name (:func:`stage_name`). ``inputs`` are the roles ``paths.inputs`` must name; every role it names is
    declared as an upstream dataset with its parent manifest. ``preflight`` checks what the config alone
    cannot (e.g. the recipe against the input roles) before anything is recorded. With ``persistent_out``
    the body writes into ``paths.out`` itself, piece by piece (training checkpoints, each published
    atomically, must survive a killed run so that the rerun resumes); otherwise the output directory is
    built aside and swapped in whole.

    ``main`` says whether this process records: by default rank 0 of its world
    (:func:`flowpin.train.launcher.process_rank`: the process group's rank, else the launcher's ``RANK``, else
    0); an explicit value wins. A non-main rank checks the recipe the same way, but opens no tracker and
    writes no report and no manifest -- the body's declarations go to a recorder that is never written. It
    needs ``persistent_out`` (every rank sees the same output directory; the body itself decides who writes
    there): a stage without it refuses a world of several processes, on every rank, before anything is
    written.

    ``environment(recipe)`` prepares the process (see the module docstring); ``invocation`` replaces what a
    Hydra run would say (stage, sources, entry point, paths) for a run flowpin starts itself.
    """
    recipe = to_config(config_cls, cfg[block], where=block)
    paths = to_config(StagePaths, cfg.paths, where="paths")
    check_stage_paths(paths, root, run_dir=persistent_out)  # before anything is removed, created or swapped
    if invocation is not None:  # where this run writes (run metadata; the recipe keeps its paths)
        paths = invocation.paths
        check_stage_paths(paths, root, run_dir=persistent_out)
    else:
        check_hydra_dir(root)
    from flowpin.train.launcher import process_rank  # torch-free: who records is recording machinery

    rank, world = process_rank()
    if world > 1 and not persistent_out:
        raise FlowpinError(
            f"stage {block}: runs as one process, but this is rank {rank} of {world} (torchrun); start it "
            "without torchrun (only training stages run data parallel)"
        )
    # --- sweeps hook (flowpin.sweep, docs/sweeps.md): a Hydra multirun job writes out/report/manifest under
    # its own job directory; the recipe keeps the declared paths (identity), the relocation is run metadata.
    from flowpin.sweep import sweep_job

    sweep = None if invocation is not None else sweep_job(paths, root=root)
    paths = paths if sweep is None else sweep.paths
    if sweep is not None:
        check_stage_paths(paths, root, run_dir=persistent_out)
    # --- end sweeps hook
    for role in inputs:
        if role not in paths.inputs:
            raise RecipeError(
                f"paths.inputs.{role}: missing; name the upstream dataset for {role!r} (data: and manifest:)"
            )
    if preflight is not None:
        preflight(recipe, paths)
    if invocation is None:
        src = hydra_sources(root / "params")
        stage = stage_name(block, src.config_name, root)
        entry_point = stage_entry_point(root, src.config_name)
    else:
        src, stage, entry_point = invocation.sources, invocation.stage, invocation.entry_point
    main = rank == 0 if main is None else main
    if not main and not persistent_out:
        raise InternalError("stage_run(main=False) needs persistent_out: rank 0 alone would swap the output in")
    with contextlib.ExitStack() as process:  # left last: after the manifest is written
        runtime = None if environment is None else process.enter_context(environment(recipe))
        if not main:
            rec = StageRecorder(stage, root, Hasher(root))  # declarations of a non-main rank: never written
            out_dir = root / paths.out
            yield StageRun(
                recipe=recipe, paths=paths, rec=rec, out_dir=out_dir, root=root, stage=stage, runtime=runtime
            )
            return
        with (
            track_stage(stage, cfg, src, root=root, manifest=paths.manifest) as tracker,  # opened first: fails fast
            record(
                stage,
                recipe=to_plain(cfg),
                overrides=src.overrides,
                config_files=src.config_files,
                entry_point=entry_point,  # what rebuild and fork re-run
                root=root,
                manifest=paths.manifest,
                publish=published_run_context(cfg),
            ) as rec,
        ):
            if sweep is not None:  # sweeps hook: where this job wrote (runDetails.byproducts "sweep-job")
                rec.note("sweep-job", **sweep.annotations())
            if invocation is not None and invocation.declare is not None:
                invocation.declare(rec)
            for upstream in paths.inputs.values():
                rec.upstream(data=upstream.data, manifest=upstream.manifest, kind=upstream.kind)
            if persistent_out:
                (root / paths.out).mkdir(parents=True, exist_ok=True)
                run = StageRun(
                    recipe=recipe, paths=paths, rec=rec, out_dir=root / paths.out, root=root, stage=stage,
                    tracker=tracker, runtime=runtime,
                )  # fmt: skip
                yield run
            else:
                with atomic_directory(root / paths.out) as tmp:
                    run = StageRun(
                        recipe=recipe, paths=paths, rec=rec, out_dir=tmp, root=root, stage=stage, tracker=tracker,
                        runtime=runtime,
                    )  # fmt: skip
                    yield run
            if run.report is None:
                raise RecipeError(f"stage {stage}: produced no report (set run.report in the stage body)")
            atomic_write_bytes(root / paths.report, canonical_json(run.report) + b"\n")
            if not persistent_out:  # a persistent output's pieces are declared by the body (e.g. each checkpoint)
                rec.output(paths.out)
            rec.byproduct(paths.report)
            if tracker.active:
                tracker.log_report(run.report)
            rec.note("tracking", **tracker.note())  # after the last log call before signing: a degraded run says so


def check_stage_paths(paths: StagePaths, root: Path, *, run_dir: bool = False) -> None:
    """Refuse a ``paths`` block that names anything outside the repository, before the stage touches a file.

    Every key goes through :func:`~flowpin.paths.check_output_path` (a :class:`~flowpin.errors.PathError`
    naming the key, e.g. ``paths.out``, the value and the fix): ``out``, ``report``, ``manifest`` and each
    ``inputs.<role>.data`` / ``.manifest``. With ``run_dir`` (training stages, whose run directory is the
    parent of ``paths.out``: metrics, tracker files) that parent must be a directory of its own too, not the
    repository root.
    """
    for key in ("out", "report", "manifest"):
        check_output_path(getattr(paths, key), root, what=f"paths.{key}")
    if run_dir and PurePosixPath(paths.out).parent == PurePosixPath("."):
        raise PathError(
            f"paths.out={paths.out!r}: a training stage writes its run (metrics, tracker files) into the parent "
            "of paths.out, here the repository root itself; set paths.out to <run dir>/checkpoints "
            "(e.g. runs/pretrain/checkpoints)"
        )
    for role, upstream in paths.inputs.items():
        check_output_path(upstream.data, root, what=f"paths.inputs.{role}.data")
        check_output_path(upstream.manifest, root, what=f"paths.inputs.{role}.manifest")


def check_hydra_dir(root: Path) -> None:
    """Refuse a Hydra job directory outside ``root`` (a backstop: ``SweepCallback`` refuses it before Hydra
    creates it, unless the callback was removed from ``hydra.callbacks``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    key = "hydra.sweep.dir" if hc.mode == RunMode.MULTIRUN else "hydra.run.dir"
    check_hydra_location(key, str(hc.runtime.output_dir), root)


@contextlib.contextmanager
def track_stage(
    stage: str, cfg: DictConfig, src: HydraSources, *, root: Path, manifest: str | os.PathLike[str]
) -> Iterator[StageTracker]:
    """The tracker of one stage run (see the module docstring); raises ``TrackingError`` when it cannot open.

    Params on entry: :func:`stage_params`; after a clean exit (the manifest written): ``manifest``
    (:func:`manifest_params`); after an exception: ``failed``. Closed either way.
    """
    tracker = open_stage_tracker(root, stage=stage, name=run_name(stage, src.overrides))
    try:
        if tracker.active:
            tracker.log_params(stage_params(stage, cfg, src, root))
        yield tracker
        if tracker.active:
            tracker.log_params({"manifest": manifest_params(root / manifest, manifest)})
    except Exception as exc:
        if tracker.active:
            tracker.log_params({"failed": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    finally:
        tracker.close()


def run_name(stage: str, overrides: Sequence[str]) -> str:
    """The tracker's run name: the stage, then its overrides (what tells sweep jobs apart in the UI)."""
    return " ".join((stage, *overrides))[:300]


def stage_params(stage: str, cfg: DictConfig, src: HydraSources, root: Path) -> dict[str, Any]:
    """The tracker params of a stage run: stage, resolved recipe, overrides, git revision, Hydra job."""
    from flowpin import __version__
    from flowpin.environment import git_state

    git = git_state(root)
    params: dict[str, Any] = {
        "stage": stage,
        "recipe": to_plain(cfg),
        "overrides": list(src.overrides),
        "config_name": src.config_name,
        "git": {k: git[k] for k in ("commit", "dirty", "dirtyDigest", "error") if k in git},
        "flowpin": __version__,
    }
    with contextlib.suppress(Exception):  # outside a Hydra app there is no job to name
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        hc = cast(DictConfig, HydraConfig.get())  # typed as its dataclass, a DictConfig at run time
        params["hydra"] = {  # a sweep job's number and id (None in a single run)
            "mode": str(getattr(hc.mode, "name", hc.mode)),
            "job": OmegaConf.select(hc, "job.num", default=None),
            "id": OmegaConf.select(hc, "job.id", default=None),
        }
    return params


def manifest_params(path: Path, name: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``manifest`` param: the manifest's name, its file sha256 and its identity digest."""
    from flowpin.manifest.statement import load_manifest

    return {
        "path": os.fspath(name),
        "sha256": hash_bytes(path.read_bytes(), "sha256"),
        "identity": load_manifest(path).identity_digest(),
    }
