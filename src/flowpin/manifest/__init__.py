"""Signed manifests: the in-toto/SLSA statement model, the ``record`` API, verify, diff and lineage."""

from flowpin.manifest.model import Manifest, load_manifest
from flowpin.manifest.record import StageRecorder, record

__all__ = ["Manifest", "StageRecorder", "load_manifest", "record"]
