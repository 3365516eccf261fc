"""The one error tree of flowpin.

Every failure a user can cause (bad input, a tampered file, a wrong recipe key) raises a subclass of
:class:`FlowpinError` whose message names *what* is wrong, *where* (a path or a recipe key) and *how to
fix it*. ``assert`` is kept for internal invariants only.

Exit status, the one policy of every entry point (the ``flowpin`` CLI, ``flowpin exp``, stage scripts);
:func:`exit_code` maps an exception to it:

* ``0`` (:data:`EXIT_OK`): success.
* ``1`` (:data:`EXIT_FAILED`): the command answered "no", returned by the command, never raised: a verification
  failed, outputs differ, a job failed (each failure is named on the output).
* ``2`` (:data:`EXIT_INPUT`): a :class:`FlowpinError` stopped the command before it could answer (bad input, a
  recipe key to fix, a missing or tampered file it needed); ``flowpin: <Error>: <message>`` on stderr, no traceback.
* ``3`` (:data:`EXIT_IDENTITY_DIFFERS`): ``flowpin diff`` only: every output identical, but the identity differs.
* ``70`` (:data:`EXIT_INTERNAL`, ``EX_SOFTWARE``): an :class:`InternalError` or any exception flowpin did not
  raise on purpose: a flowpin bug, reported with its traceback.
* ``130`` (:data:`EXIT_INTERRUPTED`, 128 + SIGINT): interrupted (Ctrl-C).
* ``141`` (:data:`EXIT_BROKEN_PIPE`, 128 + SIGPIPE): whoever read stdout closed it early (``flowpin show M | head``).
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


class FailpointError(FlowpinError):
    """``FLOWPIN_FAILPOINT`` is malformed or names no failpoint (see :mod:`flowpin.failpoints`)."""


# --- hashing / integrity --------------------------------------------------------------------------


class IntegrityError(FlowpinError):
    """An artifact on disk does not match what a manifest pins."""


class ArtifactMissingError(IntegrityError):
    """A pinned artifact does not exist."""


class ArtifactUnreadableError(IntegrityError):
    """A pinned artifact exists but cannot be read (permissions, I/O error, corrupt compression)."""


class DigestMismatchError(IntegrityError):
    """A pinned artifact's content digest differs from the manifest."""


class TensorFileError(ArtifactUnreadableError):
    """A safetensors file's header or data offsets are malformed; refused before the safetensors library reads it."""


class NotRegularFileError(ArtifactUnreadableError):
    """A path that must be a regular file is a FIFO, device, directory, socket or (no-follow) symlink; refused
    before anything is read (:mod:`flowpin.safeio`)."""


class FileTooLargeError(ArtifactUnreadableError):
    """A file is larger than any file of its kind flowpin reads; refused before it is read (:mod:`flowpin.safeio`)."""


# --- strict JSON (flowpin.jsonio): callers re-raise these as their domain error, chained with ``from`` ---


class StrictJSONError(FlowpinError):
    """Signed or untrusted JSON breaks flowpin's strict rules. ``where`` names the document, ``reason`` says how."""

    def __init__(self, where: str, reason: str, *, key: str | None = None) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.key = key


class JSONSyntaxError(StrictJSONError):
    """Not JSON: malformed, truncated, or a number Python refuses to parse (more than 4300 digits)."""


class JSONEncodingError(StrictJSONError):
    """Not UTF-8 text."""


class JSONDuplicateKeyError(StrictJSONError):
    """An object repeats a key (parsers disagree on which one counts); ``key`` is the key."""


class JSONNonFiniteError(StrictJSONError):
    """``NaN``, ``Infinity`` or a number that overflows to infinity (``1e999``): not JSON (RFC 8259)."""


class JSONTooDeepError(StrictJSONError):
    """Arrays/objects nested deeper than the reader's bound."""


class JSONTooLargeError(StrictJSONError):
    """The document is larger than the reader's bound."""


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


class EntryPointError(ManifestError):
    """A manifest's entry point (``externalParameters.entryPoint``) cannot be re-run as recorded: its script or
    primary config is not among the files the manifest pins, or lies outside the repository."""


class MissingEntryPointError(EntryPointError):
    """The manifest was recorded before entry points were pinned: it does not say which script and config ran."""


class UnverifiedManifestError(ManifestError):
    """A consumer was handed a manifest that does not verify (signature, trusted key, or a digest it relies on).

    ``findings`` holds each failed check; the first cause is chained with ``from``.
    """

    def __init__(self, message: str, findings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.findings = findings


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


# --- OpenSSF model signing (checkpoints; flowpin.modelsign) ------------------------------------------


class ModelSigningError(FlowpinError):
    """Signing or verifying a checkpoint in the OpenSSF model-signing format failed."""


class ModelSigningInputError(ModelSigningError):
    """The checkpoint directory or signature file is missing, or the signature path lies inside the checkpoint."""


class ModelSigningKeyError(ModelSigningError, KeyFileError):
    """A model-signing key is missing, malformed, not EC P-256, untrusted, or has unsafe permissions."""


class ModelSignatureError(ModelSigningError, SignatureError):
    """A checkpoint's model-signing signature does not verify (base of the verification failures)."""


class ModelSignatureFormatError(ModelSignatureError):
    """The signature file is not a Sigstore bundle holding a model-signing DSSE envelope."""


class UntrustedModelKeyError(ModelSignatureError, UntrustedKeyError):
    """The signature names a key that is not in ``keys/model-signing/``."""


class BadModelSignatureError(ModelSignatureError, BadSignatureError):
    """The bundle's ECDSA signature does not verify with the trusted key it names."""


class ModelSignatureMismatchError(ModelSignatureError, IntegrityError):
    """The checkpoint's files differ from the signed statement (changed, added or removed files)."""


# --- release bundles (flowpin.replay.release) --------------------------------------------------------------


class ReleaseError(FlowpinError):
    """A release cannot be exported or imported."""


class ReleaseIncoherentError(ReleaseError):
    """Export refused: uncommitted changes, outputs stale against dvc.lock, a manifest that does not verify,
    an artifact neither git nor the store would carry, or a corrupt cache object."""


class ReleaseTargetError(ReleaseError):
    """The export target exists and is not empty, or lies inside the repository."""


class NotAReleaseError(ReleaseError):
    """The directory holds no readable release (no release.json, not a release envelope, unknown format)."""


class ReleaseTamperedError(ReleaseError, IntegrityError):
    """A file of a release differs from what its signed release.json lists, is missing, or is not listed."""


class ReleaseMismatchError(ReleaseError):
    """The clone is not at the released commit, or its committed release record differs from the release's."""


class ReleaseSignerError(ReleaseError, UntrustedKeyError):
    """``--expect-keyid`` was given and release.json is not signed by that key (or the key is not in the
    clone's committed keys/)."""


class StoreObjectMissingError(ReleaseError, ArtifactMissingError):
    """A DVC object of a dvc.lock out is in neither the cache (export) nor the release's store (import)."""


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


class NumericsPinError(PrecisionError):
    """The CPU kernels in use are not the instruction set the run pins (``ATEN_CPU_CAPABILITY``)."""


class PlanError(RecipeError):
    """A launch's memory plan (``flowpin plan``) does not fit its GPUs: the message holds the per-GPU bytes
    of each part, the GPU memory and the margin, and what to change (layout, micro-batch, recompute, GPUs)."""


class CompatibilityError(FlowpinError):
    """An installed library differs from the version whose internals flowpin reviewed and patches."""


class StaleCheckpointsError(RecipeError):
    """A run directory holds checkpoints trained under another run key (recipe, data, parent or code), or
    ``FLOWPIN_STALE_CHECKPOINTS`` is not a known choice. Nothing was removed: the message names what changed
    and how to choose (restore the old setup to resume, or ``FLOWPIN_STALE_CHECKPOINTS=archive|discard``)."""


class CheckpointError(IntegrityError):
    """A training checkpoint is malformed, incomplete, or does not fit the model/optimizer it is loaded into."""


class CheckpointMissingError(CheckpointError, ArtifactMissingError):
    """A checkpoint directory or one of its files does not exist."""


class CheckpointCorruptError(CheckpointError, DigestMismatchError):
    """A checkpoint file's bytes differ from the digest its state.json records."""


class TrainingDivergedError(FlowpinError):
    """The loss or gradient norm became non-finite; the step was not applied."""


# --- moved beside their kin: replay, distributed training, tracking, sweeps, eval ---------------------------


class RebuildError(FlowpinError):
    """A stage cannot be rebuilt: a fork record, a recipe outside params/, unusable workspace, or the stage failed."""


class CodeDriftError(RebuildError):
    """Pinned code or config is neither in the checkout nor in git history at its pinned digest."""


class PinnedInputError(IntegrityError):
    """A pinned input (dataset, checkpoint, parent manifest, file set) is missing or has other bytes."""


class ReplicaDivergenceError(FlowpinError):
    """Data-parallel ranks that must hold identical replicas (weights, generators, step) do not."""


class TrackingError(FlowpinError):
    """The experiment tracker cannot be opened or served (aim missing, repository unwritable, server down)."""


class SweepError(FlowpinError):
    """A directory is not a Hydra sweep, or a sweep's files cannot be read."""


class HeldoutOverlapError(DataError):
    """A held-out text file is among the documents the corpus ingested (the models may have trained on it)."""


class DecontaminationReportError(IntegrityError):
    """The decontamination report is not the one its manifest vouches for, or does not cover the held-out set."""


# --- programming errors -------------------------------------------------------------------------------


class InternalError(FlowpinError):
    """A flowpin bug: an internal call broke its contract (not the user's input). Report it with the traceback;
    no recipe or file change fixes it."""


# --- the flow's DVC files (flowpin.dvcfile) ----------------------------------------------------------------


class DvcFileError(ManifestError, RecipeError):
    """``dvc.yaml`` or ``dvc.lock`` cannot be read, is not YAML, or is not shaped as DVC writes it
    (:mod:`flowpin.dvcfile`). A :class:`ManifestError` and a :class:`RecipeError`, as the readers it replaced
    raised (manifest recording and rebuild; ``flowpin exp``)."""


# --- exit status (the one policy; see the module docstring) -------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_IDENTITY_DIFFERS = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def exit_code(exc: BaseException) -> int:
    """The exit status an entry point ends with when ``exc`` stops it (see the module docstring)."""
    if isinstance(exc, InternalError):
        return EXIT_INTERNAL
    if isinstance(exc, FlowpinError):
        return EXIT_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    return EXIT_INTERNAL
