"""Signed manifests: the in-toto/SLSA statement model, the ``record`` API, verify, diff and lineage."""

from flowpin.manifest.record import StageRecorder, record
from flowpin.manifest.statement import Manifest, load_manifest

__all__ = ["Manifest", "StageRecorder", "load_manifest", "record"]
