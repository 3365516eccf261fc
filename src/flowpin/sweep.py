"""Hydra sweeps: a directory per job, a unique directory per sweep, and the table of a sweep.

**One directory per job.** ``python stages/train.py -m model=tiny,tiny_wide`` runs one Hydra job per
combination: Hydra's basic launcher one after the other in this process, ``hydra/launcher=joblib`` in
parallel worker processes, ``hydra/launcher=slurm`` as a SLURM job array through submitit. Left alone,
every job would write the recipe's ``paths.out``, ``paths.report`` and ``paths.manifest``: the same
files. In a multirun, :func:`flowpin.stage.stage_run` asks :func:`sweep_job` for the job's paths, which
are the declared ones placed under the job's directory ``<sweep dir>/<job num>/``, mirroring the
repository's layout::

    multirun/2025-11-20/14-03-22-48121-9f2c1a/      the sweep (hydra.sweep.dir)
      multirun.yaml  flowpin-sweep.json             Hydra's sweep config; planned jobs
      0/                                            job 0 (hydra.sweep.subdir)
        .hydra/{config,hydra,overrides}.yaml  train.log  flowpin-job.json
        runs/pretrain/checkpoints/step-000004/  runs/pretrain/metrics.jsonl
        reports/pretrain.json  manifests/pretrain.json
      1/ ...

The manifest's identity keeps the recipe as declared, ``paths`` included, so the identities of two jobs
differ exactly by what was swept (their recipe values, their overrides and, for a swept config group, the
group file composed). Where the job actually wrote is run metadata: the ``sweep-job`` byproduct in
``runDetails`` (:meth:`SweepJob.annotations`). Subjects are named where they are
(``multirun/.../0/runs/pretrain/checkpoints/step-000004``), so ``flowpin verify`` re-hashes them in
place; :func:`job_relative` strips a job's directory from such a name.

**Unique sweep directories.** Hydra's default names a sweep to the second, so two sweeps started in the
same second would share one directory and overwrite each other's jobs. ``params/common/hydra.yaml``
appends ``${flowpin.unique:}`` (:func:`unique_suffix`: the launching process's pid and 24 random bits),
resolved once per sweep: OmegaConf caches it and Hydra copies the cache into every job's config, in
this process or another. A sweep directory given explicitly (``hydra.sweep.dir=...``) is used as is;
re-running a sweep into its own directory resumes its jobs from their checkpoints.

**Job states, and the hook for progress bars.** :class:`SweepCallback` (a Hydra callback that
``params/common/hydra.yaml`` installs for every stage) writes ``flowpin-sweep.json`` (the planned
number of jobs) when a sweep starts and ``<job dir>/flowpin-job.json`` (running, then completed or
failed with the error) around each job, in whichever process or machine runs it. :func:`sweep_progress`
counts them from the files alone: that is what a progress bar polls, since joblib and SLURM jobs run
in other processes whose Hydra callbacks cannot reach a bar in the launching one.

**The table.** :func:`read_sweep` gathers, per job, the overrides (those whose values differ across the
jobs are the table's columns), a status (the manifest verifies / does not / the job failed / is still
running / was killed) and final metrics from the job's report; ``flowpin sweep`` prints it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.display import safe
from flowpin.errors import FlowpinError, PathError, RecipeError, SweepError, exit_code
from flowpin.paths import to_name
from flowpin.recipe import StagePaths, check_hydra_outputs

SWEEP_FILE = "flowpin-sweep.json"
"""In the sweep directory: what the sweep was launched with and how many jobs it plans."""
JOB_FILE = "flowpin-job.json"
"""In each job's directory: the job's state (``running``, ``completed``, ``failed``)."""
DEFAULT_METRICS = ("steps", "loss.last", "probe_loss.before", "probe_loss.after")
"""Report keys ``flowpin sweep`` shows by default (those present in some job's report)."""
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


# --- resolvers (params/common/hydra.yaml) -------------------------------------------------------------


def unique_suffix() -> str:
    """``<pid>-<6 hex>``: tells apart sweeps started in the same second (on one machine by the pid, across
    machines sharing a file system by the random part)."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def _multirun_only(mode: object, value: str) -> str | None:
    """``value`` in a multirun, else None (``hydra.output_subdir``: ``.hydra/`` only for sweep jobs)."""
    return value if getattr(mode, "name", mode) == "MULTIRUN" else None


def register_resolvers() -> None:
    """Register ``flowpin.unique`` (cached: one value per config, copied into every job) and
    ``flowpin.multirun_only``, which ``params/common/hydra.yaml`` uses; idempotent.

    Called by :class:`SweepCallback` when Hydra instantiates it, in the launching process before Hydra
    resolves ``hydra.sweep.dir`` or ``hydra.output_subdir``, and again wherever a launcher unpickles it (a joblib
    worker, a SLURM node), before that job's directory is resolved. Code that composes and resolves the
    ``hydra`` node itself, without running Hydra's app (``compose(..., return_hydra_config=True)``), calls it
    first.
    """
    for name, resolver, cached in (
        ("flowpin.unique", unique_suffix, True),
        ("flowpin.multirun_only", _multirun_only, False),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=cached)


# --- one directory per job (the hook in flowpin.stage.stage_run) --------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepJob:
    """One job of a Hydra multirun, and where it writes."""

    num: int
    """``hydra.job.num``: the job's index in the sweep."""
    dir: str
    """The job's directory (repository-relative): ``<sweep dir>/<hydra.sweep.subdir>``."""
    sweep_dir: str
    """The sweep's directory (repository-relative)."""
    declared: StagePaths
    """The recipe's ``paths`` as composed: what the manifest's identity records."""

    @property
    def paths(self) -> StagePaths:
        """Where this job writes: ``out``, ``report`` and ``manifest`` placed under :attr:`dir`."""
        return relocate(self.declared, self.dir)

    def annotations(self) -> dict[str, Any]:
        """The ``sweep-job`` byproduct of the job's manifest (run metadata, not identity)."""
        actual = self.paths
        return {
            "sweepDir": self.sweep_dir,
            "job": self.num,
            "jobDir": self.dir,
            "paths": {key: {"declared": getattr(self.declared, key), "actual": getattr(actual, key)} for key in _MOVED},
        }


_MOVED = ("out", "report", "manifest")


def relocate(paths: StagePaths, job_dir: str) -> StagePaths:
    """``paths`` with ``out``, ``report`` and ``manifest`` under ``job_dir`` (inputs stay: jobs share them)."""

    def under(name: str) -> str:
        return f"{job_dir}/{PurePosixPath(name).as_posix()}"

    return dataclasses.replace(paths, out=under(paths.out), report=under(paths.report), manifest=under(paths.manifest))


def job_relative(name: str, job_dir: str) -> str:
    """An artifact name with the job's directory stripped (``runs/pretrain/...``): how the outputs of two
    jobs of a sweep pair up. Names outside ``job_dir`` are returned unchanged."""
    prefix = job_dir.rstrip("/") + "/"
    return name[len(prefix) :] if name.startswith(prefix) else name


def sweep_job(paths: StagePaths, *, root: Path) -> SweepJob | None:
    """The running Hydra job's :class:`SweepJob` in a multirun; None in a single run or outside Hydra.

    The job directory is Hydra's (``hydra.runtime.output_dir``); it must lie inside the project, as every
    artifact a manifest names does (:class:`RecipeError` naming ``hydra.sweep.dir`` otherwise).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    output_dir = Path(str(hc.runtime.output_dir))
    try:
        job_dir = to_name(output_dir, root)
    except PathError as exc:
        raise RecipeError(
            f"hydra.sweep.dir: the job directory {output_dir} is outside the project {root}; a manifest names "
            "artifacts inside the project: keep hydra.sweep.dir relative (default multirun/...)"
        ) from exc
    subdir = PurePosixPath(str(hc.sweep.subdir))
    parts = PurePosixPath(job_dir).parts
    depth = len(subdir.parts)
    sweep_dir = PurePosixPath(*parts[:-depth]).as_posix() if parts[-depth:] == subdir.parts else job_dir
    return SweepJob(num=int(hc.job.num), dir=job_dir, sweep_dir=sweep_dir, declared=paths)


# --- job states and progress (Hydra callback) ---------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_multirun(config: DictConfig) -> bool:
    return _multirun_only(OmegaConf.select(config, "hydra.mode"), "yes") is not None


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep of ``config`` runs (Hydra's basic sweeper); None when it cannot tell."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines = [*(f"{k}={v}" for k, v in params.items()), *config.hydra.overrides.task]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
        return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # e.g. glob() sweeps need Hydra's config loader: the count is only informative
        return None


_BARS: dict[str, Any] = {}
"""The running sweeps' progress bars (:class:`flowpin.progress.PollingProgress`) by sweep directory."""


class SweepCallback(Callback):
    """Writes the sweep's and each job's state files (see the module docstring); in a single run it only checks.

    Installed by ``params/common/hydra.yaml`` (``hydra.callbacks.flowpin_sweep``). Constructing it registers
    the resolvers that file uses (:func:`register_resolvers`), in every process that runs a job. In every run,
    single or sweep, it first refuses Hydra settings that would write outside the repository
    (:func:`flowpin.recipe.check_hydra_outputs`), before Hydra creates a directory or opens a log:
    ``flowpin: PathError: ...`` on stderr and the exit status of an input error, 2
    (:func:`flowpin.errors.exit_code`; Hydra turns an exception of a callback into a warning, so the refusal is a
    ``SystemExit``).
    """

    def __init__(self) -> None:
        register_resolvers()  # before Hydra resolves the sweep directory (see register_resolvers)

    def __reduce__(self) -> tuple[type[SweepCallback], tuple[()]]:
        return (SweepCallback, ())  # unpickled in a launcher's worker through __init__: its resolvers too

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_writes_outside(config, multirun=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = OmegaConf.select(config, "hydra.launcher") or {}
        tasks = int(launcher.get("tasks_per_node", 1)) * int(launcher.get("nodes", 1))
        if tasks != 1:
            raise RecipeError(
                f"hydra.launcher: nodes x tasks_per_node = {tasks}; a sweep job is one process (flowpin's data "
                "parallelism is torchrun's, not SLURM tasks'): set hydra.launcher.tasks_per_node=1 and nodes=1"
            )
        _refuse_writes_outside(config, multirun=True)
        picklable_schemas()  # before the launcher sends the ConfigStore to its workers (joblib)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": config.hydra.job.config_name,
            "launcher": launcher.get("_target_"),
            "overrides": list(config.hydra.overrides.task),
            "jobs": planned_jobs(config),
            "startedOn": _now(),
        }
        atomic_write_bytes(sweep_dir / SWEEP_FILE, canonical_json(state) + b"\n")
        # A bar over the sweep's jobs (terminal only): jobs run in worker processes or on other machines, so
        # it polls their state files; stopped in on_multirun_end.
        from flowpin.progress import PollingProgress

        def poll() -> tuple[int, int | None]:
            counts = sweep_progress(sweep_dir)
            return counts.done, counts.planned

        # held outside the callback: Hydra's joblib launcher pickles callbacks to its workers (a bar has a lock)
        _BARS[str(sweep_dir)] = PollingProgress(f"sweep {sweep_dir.name}", poll, unit="job")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        bar = _BARS.pop(str(Path(str(config.hydra.sweep.dir))), None)
        if bar is not None:
            bar.close()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _is_multirun(config):
            self._write(config, {"state": "running", "startedOn": _now()})

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        from hydra.core.utils import JobStatus

        ok = job_return is not None and job_return.status == JobStatus.COMPLETED
        state: dict[str, Any] = {"state": "completed" if ok else "failed", "finishedOn": _now()}
        if not ok:
            error = getattr(job_return, "_return_value", None)  # the exception (``return_value`` re-raises it)
            state["error"] = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        self._write(config, state)

    @staticmethod
    def _write(config: DictConfig, update: Mapping[str, Any]) -> None:
        job_dir = Path(str(config.hydra.runtime.output_dir))
        path = job_dir / JOB_FILE
        previous = _read_json(path) if path.is_file() else {}
        state = {
            **previous,
            "job": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            **update,
        }
        if update.get("state") == "running":
            state.pop("error", None)
            state.pop("finishedOn", None)
        atomic_write_bytes(path, canonical_json(state) + b"\n")


def _refuse_writes_outside(config: DictConfig, *, multirun: bool) -> None:
    try:
        check_hydra_outputs(config, multirun=multirun)
    except FlowpinError as exc:
        print(f"flowpin: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(exit_code(exc)) from exc


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepProgress:
    """Job counts of a sweep, from its state files alone (any launcher, any process)."""

    planned: int | None
    """Jobs the sweep plans (None when unknown)."""
    running: int
    completed: int
    failed: int

    @property
    def done(self) -> int:
        """Jobs finished, either way: ``(done, planned)`` is the ``(done, total)`` a progress hook takes."""
        return self.completed + self.failed


def sweep_progress(sweep_dir: Path) -> SweepProgress:
    """Count the jobs of ``sweep_dir`` by state: what a progress bar over a sweep polls."""
    planned = _read_json(sweep_dir / SWEEP_FILE).get("jobs") if (sweep_dir / SWEEP_FILE).is_file() else None
    counts = {"running": 0, "completed": 0, "failed": 0}
    for path in sweep_dir.glob(f"*/{JOB_FILE}"):
        state = _read_json(path).get("state")
        if state in counts:
            counts[state] += 1
    return SweepProgress(planned=planned if isinstance(planned, int) else None, **counts)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SweepError(f"{path}: cannot read ({exc}); delete it if the job is gone") from exc
    if not isinstance(value, dict):
        raise SweepError(f"{path}: expected a JSON object")
    return value


# --- the table (flowpin sweep) -----------------------------------------------------------------------

STATUSES = ("ok", "invalid", "failed", "running", "killed", "missing")
"""``ok``: the manifest verifies; ``invalid``: it does not; ``failed``: the job raised; ``running``: started,
no manifest yet; ``killed``: started on this host, its process is gone; ``missing``: no manifest."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobRow:
    """One job of a sweep, as ``flowpin sweep`` shows it."""

    num: int
    dir: str
    """The job's directory (under the sweep directory as it was given)."""
    overrides: dict[str, str]
    """Every task override of the job, ``key → value`` (``.hydra/overrides.yaml``)."""
    status: str
    """One of :data:`STATUSES`."""
    detail: str
    """Why a job is not ``ok`` (the first verification finding, the job's error)."""
    manifest: str | None
    """The job's manifest (relocated ``paths.manifest``; for ``flowpin diff``), when its recipe names one."""
    metrics: dict[str, Any]
    """Report values by dotted key (absent keys omitted)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepTable:
    """A sweep's jobs, the override keys that differ across them, and the metrics shown."""

    sweep_dir: str
    planned: int | None
    swept: tuple[str, ...]
    """Override keys whose values differ across jobs (or that some jobs lack), in first-seen order."""
    metrics: tuple[str, ...]
    jobs: tuple[JobRow, ...]

    @property
    def ok(self) -> bool:
        """Every planned job ran and its manifest verifies."""
        complete = self.planned is None or len(self.jobs) >= self.planned
        return complete and all(j.status == "ok" for j in self.jobs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep_dir,
            "planned": self.planned,
            "swept": list(self.swept),
            "metrics": list(self.metrics),
            "ok": self.ok,
            "jobs": [j.as_dict() for j in self.jobs],
        }


Verifier = Callable[[Path], str | None]
"""Verifies a manifest file: None when it verifies, else the first finding (e.g. ``verify_manifest``)."""


@contextlib.contextmanager
def manifest_verifier(root: Path, *, hash_workers: int = 1) -> Iterator[Verifier]:
    """The :data:`Verifier` ``flowpin sweep`` uses: ``flowpin verify``'s checks against ``root``'s trust store,
    through the stat cache (closed on exit), hashing in ``hash_workers`` processes (the caller's choice)."""
    from flowpin.hashing import DEFAULT_ALGORITHM, Hasher, default_cache
    from flowpin.manifest.verify import verify_manifest
    from flowpin.signing import load_trust_store

    trusted = load_trust_store(root)
    cache = default_cache(root)
    hasher = Hasher(root, DEFAULT_ALGORITHM, cache=cache, workers=hash_workers)

    def verify(path: Path) -> str | None:
        report = verify_manifest(path, root=root, trusted=trusted, hasher=hasher)
        return None if report.ok else str(report.findings[0])

    try:
        yield verify
    finally:
        cache.close()


def split_override(line: str) -> tuple[str, str]:
    """``key=value`` → ``(key, value)``; the key keeps Hydra's ``+``/``++``/``~`` prefix."""
    key, sep, value = line.partition("=")
    return key, value if sep else ""


def _is_job_dir(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() or (path / JOB_FILE).is_file()


def _job_dirs(sweep_dir: Path) -> list[Path]:
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in sweep_dir.rglob(JOB_FILE)}
    return sorted(found - {sweep_dir})


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SweepError(f"{path}: cannot read ({exc}); the job's Hydra snapshot is damaged") from exc


def _declared(job_dir: Path, key: str) -> str | None:
    """``paths.<key>`` of the job's composed recipe (``.hydra/config.yaml``), interpolations resolved."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    try:
        value = OmegaConf.select(OmegaConf.load(path), f"paths.{key}")
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise SweepError(f"{path}: paths.{key} cannot be resolved ({exc})") from exc
    return None if value is None else str(value)


def _alive(state: Mapping[str, Any]) -> bool | None:
    """Whether the process that ran a job still runs: None when it ran on another host."""
    if state.get("host") != socket.gethostname() or not isinstance(state.get("pid"), int):
        return None
    try:
        os.kill(state["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_job(job_dir: Path, *, verify: Verifier, metrics: Sequence[str]) -> JobRow:
    """One job's row: overrides, status (verifying its manifest with ``verify``) and report metrics."""
    state = _read_json(job_dir / JOB_FILE) if (job_dir / JOB_FILE).is_file() else {}
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    lines = _load_yaml(overrides_file) if overrides_file.is_file() else state.get("overrides", [])
    if not isinstance(lines, list):
        raise SweepError(f"{overrides_file}: expected a list of overrides")
    num = state.get("job")
    if not isinstance(num, int):
        num = int(job_dir.name) if job_dir.name.isdigit() else -1
    manifest_name, report_name = _declared(job_dir, "manifest"), _declared(job_dir, "report")
    manifest = job_dir / manifest_name if manifest_name else None
    values: dict[str, Any] = {}
    if report_name and (job_dir / report_name).is_file():
        from flowpin.manifest.diff import flatten

        report = flatten(_read_json(job_dir / report_name))
        values = {k: report[k] for k in metrics if k in report}
    status, detail = "missing", ""
    if manifest is not None and manifest.is_file():
        finding = verify(manifest)
        status, detail = ("ok", "") if finding is None else ("invalid", finding)
    elif state.get("state") == "failed":
        status, detail = "failed", str(state.get("error", ""))
    elif state.get("state") == "running":
        status = "killed" if _alive(state) is False else "running"
        detail = "its process is gone; re-run the sweep into this directory to resume" if status == "killed" else ""
    elif manifest is None:
        detail = "the job's recipe names no paths.manifest"
    else:
        detail = f"no manifest at {manifest_name}"
    return JobRow(
        num=num,
        dir=job_dir.as_posix(),
        overrides=dict(split_override(str(line)) for line in lines),
        status=status,
        detail=detail,
        manifest=None if manifest is None else manifest.as_posix(),
        metrics=values,
    )


def read_sweep(sweep_dir: Path, *, verify: Verifier, metrics: Sequence[str] | None = None) -> SweepTable:
    """The table of the sweep in ``sweep_dir`` (see the module docstring); :class:`SweepError` when it is
    not one. ``metrics`` are dotted report keys (default: those of :data:`DEFAULT_METRICS` some job reports)."""
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir}: no such directory; pass a sweep directory (multirun/<date>/<time>-<id>)")
    if _is_job_dir(sweep_dir):
        raise SweepError(f"{sweep_dir}: a job of a sweep, not a sweep; pass its sweep directory {sweep_dir.parent}")
    wanted = DEFAULT_METRICS if metrics is None else tuple(metrics)
    jobs = [read_job(d, verify=verify, metrics=wanted) for d in _job_dirs(sweep_dir)]
    if not jobs:
        raise SweepError(
            f"{sweep_dir}: not a sweep directory (no <job>/.hydra/overrides.yaml nor <job>/{JOB_FILE}); "
            "pass the directory a `-m` run writes (multirun/<date>/<time>-<id>)"
        )
    jobs.sort(key=lambda j: (j.num, j.dir))
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    swept = tuple(k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1)
    shown = tuple(m for m in wanted if metrics is not None or any(m in j.metrics for j in jobs))
    planned = _read_json(sweep_dir / SWEEP_FILE).get("jobs") if (sweep_dir / SWEEP_FILE).is_file() else None
    return SweepTable(
        sweep_dir=sweep_dir.as_posix(),
        planned=planned if isinstance(planned, int) else None,
        swept=swept,
        metrics=shown,
        jobs=tuple(jobs),
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def render_sweep(table: SweepTable) -> str:
    """The table as aligned text: job, swept overrides, status, metrics; then the jobs that are not ok."""
    header = ["job", *table.swept, "status", *table.metrics]
    rows = [
        [
            str(j.num),
            *(j.overrides.get(k, "-") for k in table.swept),
            j.status,
            *(_cell(j.metrics.get(m)) for m in table.metrics),
        ]
        for j in table.jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    counts = {s: sum(j.status == s for j in table.jobs) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    planned = f" of {table.planned} planned" if table.planned is not None else ""
    lines.insert(0, f"sweep {table.sweep_dir}: {len(table.jobs)} job(s){planned}: {summary}")
    for j in table.jobs:
        if j.detail:
            lines.append(f"job {j.num} ({j.dir}): {j.status}: {j.detail}")
    return "\n".join(safe(line) for line in lines)  # overrides, metrics and findings come from the jobs' files


__all__ = [
    "DEFAULT_METRICS",
    "JOB_FILE",
    "SWEEP_FILE",
    "JobRow",
    "SweepCallback",
    "SweepError",
    "SweepJob",
    "SweepProgress",
    "SweepTable",
    "job_relative",
    "manifest_verifier",
    "planned_jobs",
    "read_sweep",
    "register_resolvers",
    "relocate",
    "render_sweep",
    "sweep_job",
    "sweep_progress",
    "unique_suffix",
]


# --- the recipe schemas in a launcher's workers ------------------------------------------------------------------
# Hydra's joblib launcher sends its singletons (the ConfigStore with flowpin's recipe schemas,
# flowpin.recipe_schema) to worker processes, which compose each job. The schemas are classes made at run time: by
# value, they would carry copies of dataclasses' MISSING sentinel, which OmegaConf then takes for a default
# ("_MISSING_TYPE is not a ListConfig"). So each is pickled by reference: named here, and rebuilt by this module's
# __getattr__ in the process that unpickles it, from the config dataclass its name encodes.

_SCHEMA_PREFIX = "Schema__"
_RECIPE_PREFIX = "Recipe__"
_SCHEMAS: dict[str, type] = {}


def picklable_schemas() -> None:
    """Make every recipe schema in Hydra's ConfigStore picklable by reference (see the comment above).

    The stage schemas are read from the ConfigStore; the nested ones are ``schema_of``'s (cached, so the same
    classes), named from the config dataclasses they mirror, found by walking every stage config's types."""
    import dataclasses
    import typing

    from hydra.core.config_store import ConfigStore

    from flowpin.recipe_schema import MODEL_CONFIG, SCHEMA_GROUP, STAGE_SCHEMAS, config_class, schema_of

    for block in STAGE_SCHEMAS:
        node = ConfigStore.instance().repo.get(SCHEMA_GROUP, {}).get(f"{block}.yaml")
        schema = OmegaConf.get_type(node.node) if node is not None else None
        if isinstance(schema, type) and dataclasses.is_dataclass(schema):
            _name(schema, _RECIPE_PREFIX + block)
    todo = [config_class(s.config) for s in STAGE_SCHEMAS.values()]
    todo += [config_class(c) for c in ("flowpin.recipe:StagePaths", "flowpin.recipe_schema:ProvenanceConfig")]
    todo.append(config_class(MODEL_CONFIG))
    seen: set[type] = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        _name(schema_of(cls), _SCHEMA_PREFIX + cls.__module__.replace(".", "__") + "___" + cls.__qualname__)
        hints = typing.get_type_hints(cls)
        todo.extend(t for f in dataclasses.fields(cls) for t in _dataclass_types(hints[f.name]))


def _dataclass_types(tp: Any) -> list[type]:
    import dataclasses
    import typing

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [tp]
    return [t for arg in typing.get_args(tp) for t in _dataclass_types(arg)]


def _name(schema: type, name: str) -> None:
    schema.__module__ = __name__
    schema.__qualname__ = name  # what pickle looks up; __name__ (in OmegaConf's messages) stays readable
    _SCHEMAS[name] = schema


def __getattr__(name: str) -> type:
    if name in _SCHEMAS:
        return _SCHEMAS[name]
    from flowpin.recipe_schema import config_class, schema_of, stage_schema

    if name.startswith(_RECIPE_PREFIX):
        schema = stage_schema(name.removeprefix(_RECIPE_PREFIX))
        _name(schema, name)
        return schema
    if name.startswith(_SCHEMA_PREFIX):
        module, _, qualname = name.removeprefix(_SCHEMA_PREFIX).partition("___")
        schema = schema_of(config_class(f"{module.replace('__', '.')}:{qualname}"))
        _name(schema, name)
        return schema
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
