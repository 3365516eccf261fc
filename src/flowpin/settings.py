"""Every ``FLOWPIN_*`` environment variable flowpin reads, read in one place.

Environment variables are how a user chooses *where* and *how* flowpin works (which key signs, which Aim
repository tracks, whether bars draw), never *what* a stage computes: that is the recipe. No other module
reads ``os.environ`` for a ``FLOWPIN_*`` name; each takes a :class:`Settings` (or one of its fields) from its
caller, and an entry point builds one with :meth:`Settings.from_env`. Values are passed through as the user
wrote them; the module that owns a setting validates it and raises its named error (``FLOWPIN_TRACKING=yes``
is a :class:`~flowpin.errors.TrackingError` from :mod:`flowpin.tracking.aim`, for example).

``flowpin --help`` lists :data:`VARIABLES`. The fingerprint of a run leaves all of them out of the
environment it records (:mod:`flowpin.environment`): none of them changes what is computed, except
``FLOWPIN_DIGEST_ALGORITHM``, which names the digest a manifest records and is pinned.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

ROOT = "FLOWPIN_ROOT"
SIGNING_KEY = "FLOWPIN_SIGNING_KEY"
MODEL_SIGNING_KEY = "FLOWPIN_MODEL_SIGNING_KEY"
DIGEST_ALGORITHM = "FLOWPIN_DIGEST_ALGORITHM"
PROGRESS = "FLOWPIN_PROGRESS"
TRACKING = "FLOWPIN_TRACKING"
AIM_REPO = "FLOWPIN_AIM_REPO"
STALE_CHECKPOINTS = "FLOWPIN_STALE_CHECKPOINTS"
FAILPOINT = "FLOWPIN_FAILPOINT"

VARIABLES: Mapping[str, str] = {
    ROOT: "the project root (default: the nearest directory above the working directory holding dvc.yaml)",
    SIGNING_KEY: "the Ed25519 key that signs manifests (default .flowpin/keys/signing.key)",
    MODEL_SIGNING_KEY: "the EC P-256 key that signs model releases (default .flowpin/keys/model-signing.key)",
    DIGEST_ALGORITHM: "the digest manifests record (default sha256; recorded, so a rebuild replays it)",
    PROGRESS: "0 turns every progress bar off, even on a terminal (CI=true does too)",
    TRACKING: "aim (default: an Aim run per stage) or off",
    AIM_REPO: "the Aim repository stage runs go to (default <root>/.aim; aim://HOST:PORT for a server)",
    STALE_CHECKPOINTS: "archive or discard: what becomes of checkpoints trained under another run key "
    "(default: refuse and keep them)",
    FAILPOINT: "NAME[:MATCH][@N]: crash at a named point (fault-injection tests; see flowpin.failpoints)",
}
"""Each variable and what it chooses (``flowpin --help`` prints this table)."""

_FALSE = ("", "0", "false", "no")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The ``FLOWPIN_*`` variables of one environment, as the user set them (``None``: unset)."""

    root: str | None = None
    signing_key: str | None = None
    model_signing_key: str | None = None
    digest_algorithm: str | None = None
    progress_off: bool = False
    """``FLOWPIN_PROGRESS=0``, or ``CI`` set to a true value (a CI log is no terminal to draw on)."""
    tracking: str | None = None
    aim_repo: str | None = None
    stale_checkpoints: str | None = None
    failpoint: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of ``environ`` (default ``os.environ``); an empty value counts as unset."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value else None

        return cls(
            root=get(ROOT),
            signing_key=get(SIGNING_KEY),
            model_signing_key=get(MODEL_SIGNING_KEY),
            digest_algorithm=get(DIGEST_ALGORITHM),
            progress_off=(env.get(PROGRESS, "").strip() == "0") or env.get("CI", "").strip().lower() not in _FALSE,
            tracking=get(TRACKING),
            aim_repo=get(AIM_REPO),
            stale_checkpoints=get(STALE_CHECKPOINTS),
            failpoint=get(FAILPOINT),
        )


__all__ = [
    "AIM_REPO",
    "DIGEST_ALGORITHM",
    "FAILPOINT",
    "MODEL_SIGNING_KEY",
    "PROGRESS",
    "ROOT",
    "SIGNING_KEY",
    "STALE_CHECKPOINTS",
    "TRACKING",
    "VARIABLES",
    "Settings",
]
