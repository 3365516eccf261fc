"""The one error tree of flowpin.

Every failure a user can cause (bad input, a tampered file, a wrong recipe key) raises a subclass of
:class:`FlowpinError` whose message names *what* is wrong, *where* (a path or a recipe key) and *how to
fix it*. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class FlowpinError(Exception):
    """Base of every error flowpin raises on purpose."""


# --- canonical form / paths / atomic writes -------------------------------------------------------


class CanonicalError(FlowpinError):
    """A value cannot be serialised canonically (NaN, bytes, non-string keys, lone surrogates...)."""


class PathError(FlowpinError):
    """An artifact name is unsafe: absolute, contains '..', or resolves outside the repository."""


class WriteError(FlowpinError):
    """An atomic write could not be completed (disk full, permissions); nothing was published."""


# --- hashing / integrity --------------------------------------------------------------------------


class IntegrityError(FlowpinError):
    """An artifact on disk does not match what a manifest pins."""


class ArtifactMissingError(IntegrityError):
    """A pinned artifact does not exist."""


class ArtifactUnreadableError(IntegrityError):
    """A pinned artifact exists but cannot be read (permissions, I/O error, corrupt compression)."""


class DigestMismatchError(IntegrityError):
    """A pinned artifact's content digest differs from the manifest."""


class UnsupportedAlgorithmError(FlowpinError):
    """A digest algorithm that flowpin does not implement was requested."""


# --- manifests ------------------------------------------------------------------------------------


class ManifestError(FlowpinError):
    """A manifest or envelope is malformed."""


class ManifestParseError(ManifestError):
    """The file is not valid JSON (malformed or truncated) or its payload cannot be decoded."""


class SchemaError(ManifestError):
    """The envelope or statement violates flowpin's JSON Schema."""


class UnsupportedVersionError(ManifestError):
    """The manifest declares a manifest version this flowpin does not understand."""


class DuplicateSubjectError(ManifestError):
    """Two subjects (or two dependencies) share one name."""


# --- signatures / keys ----------------------------------------------------------------------------


class SignatureError(FlowpinError):
    """An envelope's signatures do not establish that a trusted key signed this payload."""


class MissingSignatureError(SignatureError):
    """The envelope carries no signature at all."""


class UntrustedKeyError(SignatureError):
    """The envelope is signed, but by no key in the trust store."""


class BadSignatureError(SignatureError):
    """A signature does not verify: the payload or type was changed after signing, or the sig is corrupt."""


class KeyFileError(FlowpinError):
    """A key file is missing, malformed, of the wrong algorithm, or has unsafe permissions."""


# --- recipes / stages -----------------------------------------------------------------------------


class RecipeError(FlowpinError):
    """A recipe (Hydra config) is invalid; the message names the key to fix."""


class DataError(FlowpinError):
    """Input data violates the recipe's expectations (encoding, size caps, empty corpus...)."""


class LineageError(FlowpinError):
    """The parent chain of a manifest cannot be walked (missing parent, cycle)."""


# --- data -----------------------------------------------------------------------------------------


class ShardError(DataError):
    """A shard file is corrupt, truncated, not one bounded zstd frame, or holds a line that is not JSON."""


class EmptyCorpusError(DataError):
    """The recipe selected no document at all (every pattern excluded, every file skipped)."""


class DocumentEncodingError(DataError):
    """A document's bytes are not valid UTF-8 and the recipe says such documents are an error."""


class DocumentTooLargeError(DataError):
    """A document exceeds the recipe's per-document byte cap and the recipe says that is an error."""


class CorpusTooLargeError(DataError):
    """The selected documents together exceed the recipe's total byte cap."""


class SourceFormatError(DataError):
    """A source file does not have the structure its source kind expects (e.g. no literal topics dict)."""


class EvalSetError(DataError):
    """An evaluation set needed for decontamination is missing or empty."""


class NoSurvivorsError(DataError):
    """Under this recipe no document survives a curation stage (dedup, decontaminate, mix)."""


class UnknownTopicError(RecipeError):
    """A recipe names a topic the mix's classifier does not produce."""


class TokenizerError(DataError):
    """The tokenizer cannot be trained, loaded, or does not match the data it is used with."""


class DataOrderError(DataError):
    """A batch/step request cannot be answered (step out of range, dataset and order do not match)."""


# --- training -------------------------------------------------------------------------------------


class PrecisionError(RecipeError):
    """The recipe asks for a precision (e.g. FP8) this machine cannot run; refused before training."""


class CompatibilityError(FlowpinError):
    """An installed library differs from the version whose internals flowpin reviewed and patches."""


class CheckpointError(IntegrityError):
    """A training checkpoint is malformed, incomplete, or does not fit the model/optimizer it is loaded into."""


class CheckpointMissingError(CheckpointError, ArtifactMissingError):
    """A checkpoint directory or one of its files does not exist."""


class CheckpointCorruptError(CheckpointError, DigestMismatchError):
    """A checkpoint file's bytes differ from the digest its state.json records."""


class TrainingDivergedError(FlowpinError):
    """The loss or gradient norm became non-finite; the step was not applied."""
