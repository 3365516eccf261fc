"""The run key: what a training run's checkpoints were trained from, and when they may be resumed.

``<run_dir>/run-key.json`` names what the checkpoints in ``<run_dir>/checkpoints`` were trained from: the
key's *parts* (canonical JSON: the model config, the init checkpoint, the thread count, the sha256 of each
code file, and the stage's own parts from its :class:`~flowpin.train.spec.TrainSpec` -- loop config, data
digest, order seed...) and their digest (:func:`run_key`). Checkpoints are resumed only under the same key.
:func:`flowpin.train.run.open_run` (rank 0) claims the run directory with :func:`claim_run_dir` before
training:

* the same key: the checkpoints are resumed;
* another key and no complete checkpoint: the directory is claimed under the new key;
* another key and checkpoints: refused with :class:`~flowpin.errors.StaleCheckpointsError`, which names
  each part that changed (``code: src/flowpin/train/loop.py changed; loop.steps: 150 -> 200``,
  :func:`key_changes`) and keeps the checkpoints. Nothing is deleted unless the user chooses, by running
  again with ``FLOWPIN_STALE_CHECKPOINTS=archive`` (the checkpoints, ``metrics.jsonl`` and the old
  ``run-key.json`` move to ``<run_dir>/stale/<first 12 hex of the old key>/``) or ``=discard`` (they are
  deleted); the report's ``removed_stale_checkpoints`` and ``stale_checkpoints`` say which, why and where. A
  ``run-key.json`` of an older flowpin holds the digest alone: its parts are unknown, and it is refused the
  same way.

The choice is an environment variable, read at the stage's edge (:meth:`RunClaim.from_env`), not a recipe
key: the recipe is the run's identity, and what becomes of an earlier run's checkpoints is not.

**Code.** The key's code part covers the code that can change the stage's outputs: a stage passes the
files of its ``dvc.yaml`` code deps, what its manifest pins (:meth:`flowpin.stage.StageRun.code_digests`),
so an edit to ``cli.py`` does not strand a killed run's checkpoints. A caller that names no code set (a
library or test call) gets every source file of the imported flowpin package (:func:`package_code_digests`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowpin import settings
from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import CHECKPOINTS_DIR, METRICS_FILE, RUN_KEY_FILE
from flowpin.errors import InternalError, StaleCheckpointsError, StrictJSONError
from flowpin.hashing import hash_bytes
from flowpin.jsonio import loads_strict
from flowpin.safeio import read_regular
from flowpin.settings import Settings
from flowpin.train.checkpoint import MAX_STATE_BYTES, CheckpointRef, list_checkpoints


def package_code_digests() -> dict[str, str]:
    """sha256 of every source file of the imported flowpin package, by ``flowpin/<relative path>``.

    The run key's code part when the caller names no code set (:class:`RunClaim` ``code=None``).
    """
    import flowpin
    from flowpin.hashing import hash_file
    from flowpin.manifest.record import source_files

    package = Path(flowpin.__file__).resolve().parent
    return {f"flowpin/{rel}": hash_file(package / rel, "sha256") for rel in source_files(package)}


def run_key(parts: Mapping[str, Any]) -> str:
    """The digest of a run key's parts: sha256 of their canonical JSON."""
    return hash_bytes(canonical_json(dict(parts)))


STALE_DIR = "stale"
"""``<run_dir>/stale/<old key>/``: where ``FLOWPIN_STALE_CHECKPOINTS=archive`` moves checkpoints of another key."""
STALE_CHOICES = ("refuse", "archive", "discard")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunClaim:
    """How :func:`flowpin.train.run.open_run` claims its run directory: what the run key's code part covers,
    and what becomes of checkpoints trained under another key (see the module docstring)."""

    code: Mapping[str, str] | None = None
    """sha256 of each code file the checkpoints depend on, by path. A stage passes its ``dvc.yaml`` code deps
    (``run.code_digests()``); ``None``: every source file of the imported flowpin package."""
    stale: str = "refuse"
    """Checkpoints of another run key: ``refuse`` (:class:`~flowpin.errors.StaleCheckpointsError`, nothing
    touched), ``archive`` (moved to ``<run_dir>/stale/<old key>/``) or ``discard`` (deleted)."""

    def __post_init__(self) -> None:
        if self.stale not in STALE_CHOICES:
            raise InternalError(f"RunClaim: stale={self.stale!r} is not one of {', '.join(STALE_CHOICES)}")
        if self.code is not None:  # a read-only copy: the claim is a value
            object.__setattr__(self, "code", types.MappingProxyType(dict(self.code)))

    @classmethod
    def from_env(cls, code: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> RunClaim:
        """A claim of ``code`` whose choice is ``FLOWPIN_STALE_CHECKPOINTS`` in ``environ`` (default
        ``os.environ``; unset or empty: refuse). Raises :class:`~flowpin.errors.StaleCheckpointsError` for
        another value, before anything is trained."""
        raw = Settings.from_env(environ).stale_checkpoints or ""
        choice = raw.strip().lower() or "refuse"
        if choice not in STALE_CHOICES:
            raise StaleCheckpointsError(
                f"{settings.STALE_CHECKPOINTS}={raw!r}: unknown; set it to 'archive' (move checkpoints of another run "
                "key aside) or 'discard' (delete them), or unset it to have them refused"
            )
        return cls(code=code, stale=choice)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StaleCheckpoints:
    """Checkpoints of another run key that a run took out of its directory, as the user chose."""

    choice: str
    """``archive`` or ``discard``."""
    checkpoints: tuple[str, ...]
    """Their names (``step-NNNNNN``)."""
    changed: tuple[str, ...]
    """What differed between their run key and this run's (:func:`key_changes`)."""
    archive: str | None
    """Where they went, relative to the run directory (``stale/<old key>``); ``None`` when discarded."""

    def to_json(self) -> dict[str, Any]:
        return {"choice": self.choice, "changed": list(self.changed), "archive": self.archive}


def claim_run_dir(run_dir: Path, parts: Mapping[str, Any], stale: str) -> StaleCheckpoints | None:
    """Claim ``run_dir`` for a run under the key of ``parts`` (rank 0, before training) and write its
    ``run-key.json``: checkpoints of the same key are kept to resume; those of another key are refused with
    :class:`~flowpin.errors.StaleCheckpointsError` naming what changed, or, as ``stale`` chooses (``archive``,
    ``discard``), set aside. Returns what was set aside, if anything. See the module docstring."""
    if stale not in STALE_CHOICES:
        raise InternalError(f"claim_run_dir: stale={stale!r} is not one of {', '.join(STALE_CHOICES)}")
    plain = json.loads(canonical_json(dict(parts)))  # compared as it is stored: lists, not tuples
    key = run_key(plain)
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    previous = _read_run_key(run_dir / RUN_KEY_FILE)
    found = [] if previous is not None and previous.key == key else list_checkpoints(ckpt_dir)
    taken: StaleCheckpoints | None = None
    if found:
        if previous is None:
            changed = [f"unknown: no {RUN_KEY_FILE} beside them names what they were trained from"]
        elif previous.parts is None:
            changed = [f"unknown: {previous.unknown}"]
        else:
            changed = key_changes(previous.parts, plain) or [f"{RUN_KEY_FILE}: its digest does not match its parts"]
        prefix = "unknown" if previous is None or previous.key is None else previous.key[:12]
        if stale == "refuse":
            env = settings.STALE_CHECKPOINTS
            names = found[0].path.name + ("" if len(found) == 1 else f" .. {found[-1].path.name}")
            raise StaleCheckpointsError(
                f"{ckpt_dir}: {len(found)} checkpoint(s) ({names}) were trained under another run key; changed: "
                f"{'; '.join(changed)}. They are kept, not resumed. To resume them, restore the recipe, data and "
                f"code they were trained from; to start over, run again with {env}=archive "
                f"(moves them to {run_dir / STALE_DIR / prefix}/) or {env}=discard (deletes them)"
            )
        taken = _set_aside(run_dir, found, changed, stale, prefix)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / RUN_KEY_FILE, canonical_json({"key": key, "parts": plain}) + b"\n")
    return taken


@dataclasses.dataclass(frozen=True)
class _StoredKey:
    key: str | None
    parts: dict[str, Any] | None
    unknown: str
    """Why ``parts`` is ``None``."""


def _read_run_key(path: Path) -> _StoredKey | None:
    """The run key stored in ``path`` (``None``: there is none); a regular file only (a FIFO would hang here)."""
    if not path.exists():
        return None
    raw = read_regular(path, max_bytes=MAX_STATE_BYTES, what="run key", fix="move it aside or delete it")
    try:
        doc = loads_strict(raw, where=str(path), max_bytes=MAX_STATE_BYTES)
    except StrictJSONError as exc:
        return _StoredKey(key=None, parts=None, unknown=f"{RUN_KEY_FILE} is unreadable ({exc})")
    key = doc.get("key") if isinstance(doc, dict) else None
    key = key if isinstance(key, str) else None
    parts = doc.get("parts") if isinstance(doc, dict) else None
    if isinstance(parts, dict):
        return _StoredKey(key=key, parts=parts, unknown="")
    if key is not None:
        older = f"{RUN_KEY_FILE} was written by an older flowpin: it holds the key's digest, not its parts"
        return _StoredKey(key=key, parts=None, unknown=older)
    return _StoredKey(key=None, parts=None, unknown=f"{RUN_KEY_FILE} holds no run key")


def _set_aside(
    run_dir: Path, found: Sequence[CheckpointRef], changed: Sequence[str], choice: str, prefix: str
) -> StaleCheckpoints:
    """Archive (move to ``stale/<prefix>/``) or discard the checkpoints directory, with the log and key file
    of the run that wrote it."""
    pieces = [run_dir / CHECKPOINTS_DIR, run_dir / METRICS_FILE, run_dir / RUN_KEY_FILE]
    archive: str | None = None
    if choice == "archive":
        target = run_dir / STALE_DIR / prefix
        n = 1
        while target.exists():
            n += 1
            target = run_dir / STALE_DIR / f"{prefix}-{n}"
        target.mkdir(parents=True)
        for piece in pieces:
            if piece.exists():
                os.replace(piece, target / piece.name)
        archive = target.relative_to(run_dir).as_posix()
    else:
        shutil.rmtree(pieces[0])
        for piece in pieces[1:]:
            piece.unlink(missing_ok=True)
    return StaleCheckpoints(
        choice=choice, checkpoints=tuple(c.path.name for c in found), changed=tuple(changed), archive=archive
    )


def key_changes(old: Mapping[str, Any], new: Mapping[str, Any], *, limit: int = 12) -> list[str]:
    """What differs between two run keys' parts, one phrase each, at most ``limit`` (then ``N more``).

    ``code: <path> changed`` (or ``added``, ``removed``) for each code file, then ``<dotted key>: <old> -> <new>``
    for every other leaf, in key order; long values are shortened.
    """
    changes: list[str] = []
    old_code, new_code = old.get("code"), new.get("code")
    if isinstance(old_code, Mapping) and isinstance(new_code, Mapping):
        for path in sorted(set(old_code) | set(new_code)):
            if path not in old_code:
                changes.append(f"code: {path} added")
            elif path not in new_code:
                changes.append(f"code: {path} removed")
            elif old_code[path] != new_code[path]:
                changes.append(f"code: {path} changed")
    elif old_code != new_code:
        changes.append("code: changed")
    before = _leaves({k: v for k, v in old.items() if k != "code"})
    after = _leaves({k: v for k, v in new.items() if k != "code"})
    for name in sorted(set(before) | set(after)):
        if before.get(name, _ABSENT) != after.get(name, _ABSENT):
            changes.append(f"{name}: {_shown(before.get(name, _ABSENT))} -> {_shown(after.get(name, _ABSENT))}")
    if len(changes) > limit:
        changes = [*changes[:limit], f"{len(changes) - limit} more"]
    return changes


_ABSENT = object()


def _leaves(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, item in value.items():
        if isinstance(item, Mapping) and item:
            out.update(_leaves(item, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = item
    return out


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "(none)"
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 40 else text[:36] + "..."
