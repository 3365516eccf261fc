"""Experiment tracking: metadata about a run, never part of what it computes.

The package map (one concept per module):

* ``base`` -- the :class:`Tracker` protocol the training loop reports to (``log_params``: configuration,
  stored once; ``log_metrics``: measurements over steps), :class:`NullTracker` and :class:`JsonlTracker`
  (``metrics.jsonl`` in a training run's directory, with :func:`read_jsonl`).
* ``aim`` -- the Aim tracker every stage run opens (:func:`open_stage_tracker` -> :class:`StageTracker`
  over an :class:`AimTracker`; ``aim`` itself is imported only then): where runs go (``FLOWPIN_TRACKING``,
  ``FLOWPIN_AIM_REPO``), the failure policy (fail at open, degrade mid-run), params as run attributes and
  metrics as sequences, a stage's report as the ``report`` param, and :class:`FanoutTracker` (one
  interface over several trackers).
* ``aim_server`` -- serving a repository: ``aim up`` (``flowpin ui``) and ``aim server`` (remote tracking)
  as process groups on loopback, and ``aim storage reindex``. Imported by the CLI only, never by a stage.

Nothing a tracker receives is hashed: a stage writes the same bytes with tracking on, off or failing.
"""

from flowpin.errors import TrackingError
from flowpin.tracking.aim import (
    AimTracker,
    FanoutTracker,
    StageTracker,
    TrackingWarning,
    open_stage_tracker,
)
from flowpin.tracking.base import JsonlTracker, NullTracker, Tracker, read_jsonl

__all__ = [
    "AimTracker",
    "FanoutTracker",
    "JsonlTracker",
    "NullTracker",
    "StageTracker",
    "Tracker",
    "TrackingError",
    "TrackingWarning",
    "open_stage_tracker",
    "read_jsonl",
]
