"""The Aim tracker: where stage runs are tracked, the Aim run a stage logs to, and its failure policy.

What this module owns (serving a repository -- ``aim up`` / ``aim server`` -- is
:mod:`flowpin.tracking.aim_server`; the protocol and the trackers that need nothing are
:mod:`flowpin.tracking.base`):

* The switch (:func:`tracking_settings`): ``FLOWPIN_TRACKING=aim`` (default) or ``off``; ``FLOWPIN_AIM_REPO``
  names another repository -- a directory holding (or to hold) ``.aim``, relative to the project root, or a
  remote tracking server ``aim://HOST:PORT``. The default is the project's own ``<root>/.aim``, created on
  demand (:func:`ensure_repo`, with a ``.gitignore`` of its own, so it never dirties git state).
* :class:`AimTracker` -- one Aim run implementing the :class:`~flowpin.tracking.base.Tracker` protocol.
  **Params are configuration, metrics are measurements:** params (a nested mapping: the recipe, the loop's
  config and determinism settings, a stage's report) are set as run attributes (``run[key] = value``) and
  never become metric sequences; metrics are what changes over steps (loss, lr, grad norm, throughput, eval
  scores), tracked with a base context (``{"stage": ...}``) merged under each call's own
  (``{"subset": "train"}``). So a run page opens on the training curves, not on one-point configuration
  charts. ``aim`` is imported only when a tracker is opened (``import aim`` costs about a second).
* :class:`StageTracker` -- what :func:`flowpin.stage.stage_run` opens for every stage run
  (:func:`open_stage_tracker`); a stage's report is stored as the run's ``report`` param
  (:meth:`StageTracker.log_report`). **Failure policy:** a tracker that cannot be *opened* (aim missing,
  repository unwritable, remote server unreachable) fails the stage at its start with
  :class:`TrackingError`, before anything is recorded; a tracker that fails *mid-run* is switched off
  with a loud :class:`TrackingWarning`, the run goes on (``metrics.jsonl`` still gets every line) and
  the manifest's ``tracking`` note says ``status: degraded`` with the failure. Tracking never changes
  what a stage computes: the tracker is write-only and nothing it receives is hashed.
* :class:`FanoutTracker` -- one tracker interface over several (the training loop's ``metrics.jsonl``
  and the stage's Aim run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from flowpin import settings
from flowpin.errors import InternalError, TrackingError
from flowpin.settings import Settings
from flowpin.tracking.base import Tracker

_log = logging.getLogger(__name__)

TRACKING_ENV = settings.TRACKING
"""``aim`` (default): every stage run logs to Aim; ``off``: no tracker (``metrics.jsonl`` only)."""
AIM_REPO_ENV = settings.AIM_REPO
"""Another Aim repository: a directory (relative to the project root) or ``aim://HOST:PORT``."""
MODES = ("aim", "off")
AIM_DIR = ".aim"
"""The repository's directory inside its root (``aim --repo ROOT`` opens ``ROOT/.aim``)."""
REPORT_PARAM = "report"
"""The run param that holds a stage's report (:meth:`StageTracker.log_report`)."""
MAX_METRIC_LEAVES = 512
"""At most this many numeric leaves of one mapping become metrics (:func:`numeric_leaves`)."""
_INIT_LOCK = "flowpin-init.lock"
_INT64 = 2**63


class TrackingWarning(UserWarning):
    """Tracking failed mid-run and was switched off for the rest of it; the run itself goes on."""


# --- settings -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackingSettings:
    """Where (and whether) stage runs are tracked; from the environment (:func:`tracking_settings`)."""

    mode: str
    """``aim`` or ``off``."""
    repo: str
    """The Aim repository: a local directory that holds (or will hold) ``.aim``, or ``aim://HOST:PORT``."""

    @property
    def remote(self) -> bool:
        return is_remote(self.repo)


def is_remote(repo: str) -> bool:
    """Whether ``repo`` names an Aim remote tracking server (``aim://HOST:PORT``)."""
    return repo.startswith("aim://")


def tracking_settings(root: Path, environ: Mapping[str, str] | None = None) -> TrackingSettings:
    """The tracking settings for the project at ``root`` from ``FLOWPIN_TRACKING`` and ``FLOWPIN_AIM_REPO``."""
    chosen = Settings.from_env(environ)
    mode = (chosen.tracking or "").strip().lower() or "aim"
    if mode not in MODES:
        raise TrackingError(f"{TRACKING_ENV}={chosen.tracking!r}: unknown; set it to 'aim' or 'off'")
    repo = (chosen.aim_repo or "").strip()
    if not repo:
        repo = str(root)
    elif not is_remote(repo):
        repo = str((root / repo).resolve())
    return TrackingSettings(mode=mode, repo=repo)


# --- values -------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as something Aim stores as a param: JSON-like, non-finite floats and huge ints as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def numeric_leaves(value: Mapping[str, Any], *, limit: int = MAX_METRIC_LEAVES) -> dict[str, float]:
    """Every number reachable through nested mappings of ``value``, keyed by its dotted path.

    For measurements that arrive nested (eval's scores of one checkpoint: ``pass_at_1.arithmetic``), to
    be logged as metrics; never for configuration, which goes in as params. Booleans and lists (curves,
    tables) are left out; so is everything past the first ``limit`` leaves.
    """
    out: dict[str, float] = {}

    def walk(item: Any, prefix: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(item, bool):
            return
        if isinstance(item, int | float):
            out[prefix] = float(item)
        elif isinstance(item, Mapping):
            for key, sub in item.items():
                walk(sub, f"{prefix}.{key}" if prefix else str(key))

    walk(value, "")
    return out


# --- trackers -----------------------------------------------------------------------------------


def ensure_repo(repo_root: Path) -> Path:
    """Create the Aim repository ``repo_root/.aim`` if missing (safe against concurrent stages); returns it.

    The new ``.aim`` gets a ``.gitignore`` of ``*``, so it is ignored by git even in a project whose own
    ``.gitignore`` does not name it (git's dirty state is part of every manifest's identity).
    """
    aim_dir = repo_root / AIM_DIR
    if (aim_dir / "VERSION").is_file():
        return aim_dir
    try:
        aim_dir.mkdir(parents=True, exist_ok=True)
        ignore = aim_dir / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n", "utf-8")
        from filelock import FileLock

        with FileLock(str(aim_dir / _INIT_LOCK), timeout=300):
            if not (aim_dir / "VERSION").is_file():
                from aim.sdk.repo import Repo

                Repo.from_path(str(repo_root), init=True)
    except ImportError as exc:
        raise TrackingError(_no_aim(exc)) from exc
    except Exception as exc:
        raise TrackingError(
            f"cannot create the Aim repository {aim_dir}: {type(exc).__name__}: {exc}; make the directory "
            f"writable, point {AIM_REPO_ENV} elsewhere, or set {TRACKING_ENV}=off"
        ) from exc
    return aim_dir


def _no_aim(exc: BaseException) -> str:
    return (
        f"cannot import aim ({exc}); install it (pip install -c requirements.lock aim; it has no wheels past "
        f"Python 3.12) or set {TRACKING_ENV}=off"
    )


class AimTracker:
    """One Aim run: params are run attributes, metrics tracked under ``context`` merged with each call's.

    ``repo`` is a directory holding (or to hold) ``.aim`` -- created on demand -- or ``aim://HOST:PORT``.
    Aim's own system-resource tracker and terminal capture are off: the run holds what flowpin logs.
    Raises :class:`TrackingError` when the run cannot be opened.
    """

    def __init__(
        self,
        repo: str | Path,
        *,
        experiment: str | None = None,
        name: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        self.repo = str(repo)
        self._context = {str(k): _plain(v) for k, v in (context or {}).items()}
        logging.getLogger("aim").setLevel(logging.WARNING)  # not its INFO chatter in a stage's log (Hydra's INFO)
        try:
            if not is_remote(self.repo):
                ensure_repo(Path(self.repo))
            from aim.sdk.run import Run

            self._run: Any = Run(
                repo=self.repo,
                experiment=experiment,
                system_tracking_interval=None,
                log_system_params=False,
                capture_terminal_logs=False,
            )
            if name:
                self._run.name = name
        except TrackingError:
            raise
        except ImportError as exc:
            raise TrackingError(_no_aim(exc)) from exc
        except Exception as exc:
            where = self.repo
            if is_remote(self.repo):
                where = f"the Aim server {self.repo} (is `aim server` running there?)"
            raise TrackingError(
                f"cannot open an Aim run in {where}: {type(exc).__name__}: {exc}; fix it, point {AIM_REPO_ENV} "
                f"elsewhere, or set {TRACKING_ENV}=off"
            ) from exc
        self._hash = str(self._run.hash)

    @property
    def run_id(self) -> str:
        """The Aim run hash (the UI's ``/runs/<hash>``)."""
        return self._hash

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Set each ``key: value`` as a run attribute (nested mappings stay nested); never a metric."""
        for key, value in params.items():
            self._run[str(key)] = _plain(value)

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        ctx = {**self._context, **{str(k): _plain(v) for k, v in (context or {}).items()}}
        values = {str(name): float(value) for name, value in metrics.items()}
        if values:  # one call for all of them: a third cheaper than one per metric
            self._run.track(values, step=int(step), context=ctx)

    def close(self) -> None:
        """End the run; once it returns, Aim has flushed and released its stores (or server resources)."""
        if self._run is not None:
            run, self._run = self._run, None
            run.close()
            del run
            gc.collect()  # Aim's stores and remote handles sit in reference cycles; their finalizers flush now

    def __enter__(self) -> AimTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FanoutTracker:
    """Every event to each of ``trackers`` in order; ``run_id`` is the first one's. Closes none of them."""

    def __init__(self, *trackers: Tracker) -> None:
        if not trackers:
            raise InternalError("FanoutTracker needs at least one tracker")
        self.trackers = trackers

    @property
    def run_id(self) -> str:
        return self.trackers[0].run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(step, metrics, context)

    def close(self) -> None:
        """Nothing: each tracker belongs to whoever opened it."""


class StageTracker:
    """A stage run's tracker: its Aim run, or nothing when tracking is off; see the module's failure policy.

    ``active`` says whether anything is still being recorded; :meth:`note` is what the manifest records
    (which tracker, the run hash, the repository, and ``status: degraded`` with the failure if it failed).
    """

    def __init__(self, aim: AimTracker | None, settings: TrackingSettings, *, root: Path, stage: str) -> None:
        self._aim = aim
        self.settings = settings
        self.stage = stage
        self.failure: str | None = None
        self._hash = aim.run_id if aim is not None else None
        self._root = root

    @property
    def run_id(self) -> str:
        return self._hash or "off"

    @property
    def active(self) -> bool:
        return self._aim is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._aim is not None:
            self._guard("log_params", self._aim.log_params, params)

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        if self._aim is not None:
            self._guard("log_metrics", self._aim.log_metrics, step, metrics, context)

    def log_report(self, report: Mapping[str, Any]) -> None:
        """Store the stage's report as the run's ``report`` param (nested as written, lists included).

        A param, not metrics: a report mixes configuration (seeds, thread counts, thresholds) with end-of-run
        summaries, and as one-point metric charts it would bury the training curves on the run page.
        """
        self.log_params({REPORT_PARAM: report})

    def close(self) -> None:
        if self._aim is not None:
            self._guard("close", self._aim.close)
            self._aim = None

    def note(self) -> dict[str, Any]:
        """The manifest's ``tracking`` note (run metadata, never identity)."""
        if self.settings.mode == "off":
            return {"tracker": "off", "switch": f"{TRACKING_ENV}=off"}
        note: dict[str, Any] = {
            "tracker": "aim",
            "runHash": self._hash,
            "repo": self._repo_name(),
            "experiment": self.stage,
            "status": "degraded" if self.failure else "ok",
        }
        if self.failure:
            note["failure"] = self.failure
        return note

    def _repo_name(self) -> str:
        """The repository as the manifest may name it: relative to the project, a URL, or neither."""
        if self.settings.remote:
            return self.settings.repo
        try:
            rel = Path(self.settings.repo).resolve().relative_to(self._root.resolve())
        except ValueError:
            return f"(outside the project, {AIM_REPO_ENV})"
        return (rel / AIM_DIR).as_posix()

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            aim, self._aim = self._aim, None
            self.failure = f"{what} failed: {type(exc).__name__}: {exc}"[:500]
            message = (
                f"stage {self.stage}: Aim tracking of run {self._hash} stopped ({self.failure}); the run goes on "
                "without it (training stages still write metrics.jsonl) and the manifest's tracking note says "
                f"'degraded'. Set {TRACKING_ENV}=off to run without Aim."
            )
            _log.error(message)
            warnings.warn(message, TrackingWarning, stacklevel=3)
            if aim is not None and what != "close":
                with contextlib.suppress(Exception):
                    aim.close()

    def __enter__(self) -> StageTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_stage_tracker(
    root: Path, *, stage: str, name: str | None = None, environ: Mapping[str, str] | None = None
) -> StageTracker:
    """The tracker of one run of ``stage`` in the project at ``root`` (see :func:`tracking_settings`).

    With tracking on, opens an Aim run (experiment ``stage``, name ``name`` or ``stage``, context
    ``{"stage": stage}``) -- or raises :class:`TrackingError` (fail fast, before the stage does any work).
    """
    settings = tracking_settings(root, environ)
    if settings.mode == "off":
        return StageTracker(None, settings, root=root, stage=stage)
    aim = AimTracker(settings.repo, experiment=stage, name=name or stage, context={"stage": stage})
    return StageTracker(aim, settings, root=root, stage=stage)


def describe_note(note: Mapping[str, Any]) -> str:
    """One line for a manifest's ``tracking`` note (``flowpin show``)."""
    if note.get("tracker") == "off":
        return f"off ({note.get('switch', TRACKING_ENV + '=off')})"
    text = (
        f"{note.get('tracker')} run {note.get('runHash')} in {note.get('repo')} (experiment {note.get('experiment')})"
    )
    if note.get("status") == "degraded":
        text += f"; DEGRADED, stopped mid-run: {note.get('failure')}"
    return text


__all__ = [
    "AIM_DIR",
    "AIM_REPO_ENV",
    "MAX_METRIC_LEAVES",
    "REPORT_PARAM",
    "TRACKING_ENV",
    "AimTracker",
    "FanoutTracker",
    "StageTracker",
    "TrackingError",
    "TrackingSettings",
    "TrackingWarning",
    "describe_note",
    "ensure_repo",
    "is_remote",
    "numeric_leaves",
    "open_stage_tracker",
    "tracking_settings",
]
