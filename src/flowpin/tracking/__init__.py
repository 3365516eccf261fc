"""Experiment trackers: the :class:`Tracker` protocol the training loop reports to, and its trackers.

``base``: the protocol, :class:`NullTracker` and :class:`JsonlTracker` (``metrics.jsonl``). ``aim``: the
Aim tracker every stage run opens (:func:`open_stage_tracker`; ``aim`` itself is imported only then), the
fan-out over several trackers, and the Aim UI / remote tracking server on loopback.
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
