"""Signed manifests: the in-toto/SLSA statement and its field accessors (``statement``), recording a stage run
(``record``), digest rules (``digests``), trust and verification (``trust``, ``verify``), comparison (``diff``),
parent chains (``lineage``), where file sets outside the repository come from (``resolve``) and what a person
reads about a manifest (``summary``: ``flowpin show`` and ``flowpin verify`` output)."""

from flowpin.manifest.record import StageRecorder, record
from flowpin.manifest.statement import Manifest, load_manifest

__all__ = ["Manifest", "StageRecorder", "load_manifest", "record"]
