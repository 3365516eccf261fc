"""Experiment trackers: the :class:`Tracker` protocol the training loop reports to, and simple trackers."""

from flowpin.tracking.base import JsonlTracker, NullTracker, Tracker, read_jsonl

__all__ = ["JsonlTracker", "NullTracker", "Tracker", "read_jsonl"]
