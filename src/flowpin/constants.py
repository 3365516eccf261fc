"""The names flowpin gives the files and directories it writes, each defined once.

A run directory (``runs/<stage>/``) holds ``checkpoints/`` (``step-NNNNNN/`` each, plus ``model.json``),
``metrics.jsonl`` (the loss curve, one JSON object per event) and ``run-key.json`` (what its checkpoints were
trained from); a fork writes its own ``manifest.json`` there. A dataset directory holds its shards and an
``index.json`` listing them. Stage manifests live in ``manifests/``.
"""

from __future__ import annotations

import re

MANIFEST_DIR = "manifests"
"""Where ``dvc repro`` stages write their manifests (``manifests/<stage>.json``)."""
RUN_MANIFEST = "manifest.json"
"""A fork's manifest, inside the fork's run directory."""

CHECKPOINTS_DIR = "checkpoints"
"""``<run_dir>/checkpoints``: a run's checkpoints and the model config they load into."""
CHECKPOINT_NAME = re.compile(r"step-(\d{6,})")
"""The name of one checkpoint directory: ``step-`` and the step, zero-padded to six digits or more."""
MODEL_CONFIG = "model.json"
"""``<run_dir>/checkpoints/model.json``: the architecture the checkpoints load into."""
METRICS_FILE = "metrics.jsonl"
"""``<run_dir>/metrics.jsonl``: every event the training loop logged (rank 0)."""
RUN_KEY_FILE = "run-key.json"
"""``<run_dir>/run-key.json``: the run key the checkpoints were trained under, with its parts."""

INDEX_NAME = "index.json"
"""A dataset directory's index: its shards with their digests, and its stats (ingest, mix, tokenize...)."""

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_NAME",
    "INDEX_NAME",
    "MANIFEST_DIR",
    "METRICS_FILE",
    "MODEL_CONFIG",
    "RUN_KEY_FILE",
    "RUN_MANIFEST",
]
