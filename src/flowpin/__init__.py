"""flowpin: pin every artifact of a model flow in signed, schema-checked in-toto manifests."""

__version__ = "0.1.0"
