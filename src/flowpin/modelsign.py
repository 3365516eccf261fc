"""Checkpoints signed in the OpenSSF model-signing format, checkable with the ``model_signing`` tool alone.

flowpin's manifests are signed with Ed25519 (:mod:`flowpin.signing`); the OpenSSF tool refuses Ed25519,
so checkpoints get a second, separate key pair and signature:

* **Key**: EC P-256 (``secp256r1``, ECDSA with SHA-256). Private key: unencrypted PKCS#8 PEM, created
  0600 atomically by ``flowpin model-sign key init``, refused when group/world-accessible or not P-256.
  Default ``.flowpin/keys/model-signing.key`` (gitignored); ``FLOWPIN_MODEL_SIGNING_KEY`` overrides it.
* **Trust store**: ``keys/model-signing/<keyid>.pem`` (committed), PEM SubjectPublicKeyInfo EC P-256
  keys. ``keyid`` = hex sha256 of that PEM text as ``cryptography`` writes it -- the value model-signing
  itself records in the bundle (``verificationMaterial.publicKey.hint``), so a signature names its file.
  The two trust stores never mix: manifests trust only Ed25519 ``keys/*.pub`` (an EC key there is
  refused), model signing only EC ``keys/model-signing/*.pem`` (an Ed25519 key there is refused); the
  algorithm comes from the trusted key, never from the signature.
* **Signature file**: a Sigstore bundle (``application/vnd.dev.sigstore.bundle.v0.3+json``) holding a
  DSSE envelope whose in-toto Statement v1 (``predicateType https://model_signing/signature/v1.0``) lists
  one ``resources`` entry (name, sha256) per file of the checkpoint. It is written *outside* the
  checkpoint, because checkpoints live in DVC-tracked directories (``runs/<stage>/checkpoints``) whose
  digest a new file would change: by default ``<run>/model-signatures/<step-NNNNNN>.sig`` for a
  checkpoint in a ``checkpoints/`` directory, else ``<checkpoint>.sig`` beside it. Written atomically.
* **Sign**: flowpin's own integrity check first (every file's sha256 against ``state.json``, every
  ``*.safetensors`` header and offsets as flowpin's loader checks them, and no file that is not part of
  the checkpoint), so a damaged or crafted checkpoint is never signed; nothing is ignored
  (git-related names included); afterwards the signed statement's digests are compared with
  ``state.json``'s records, so what was signed is exactly what flowpin checked.
* **Verify**: the bundle's key hint must name a trusted key; model-signing checks the ECDSA signature
  and re-hashes every file (nothing ignored); then flowpin's integrity check and the same cross-check
  of digests. Failures raise :class:`~flowpin.errors.ModelSignatureError` subclasses (or a checkpoint
  :class:`~flowpin.errors.IntegrityError`); missing inputs :class:`~flowpin.errors.ModelSigningInputError`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import shlex
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flowpin import settings
from flowpin.atomic import atomic_write_bytes
from flowpin.constants import CHECKPOINTS_DIR
from flowpin.errors import (
    BadModelSignatureError,
    CheckpointError,
    ModelSignatureError,
    ModelSignatureFormatError,
    ModelSignatureMismatchError,
    ModelSigningError,
    ModelSigningInputError,
    ModelSigningKeyError,
    StrictJSONError,
    UntrustedModelKeyError,
)
from flowpin.jsonio import loads_strict
from flowpin.safeio import read_regular
from flowpin.settings import Settings
from flowpin.signing import publish_private_key
from flowpin.tensorfile import validate_safetensors
from flowpin.train.checkpoint import MAX_STATE_BYTES, STATE_FILE, read_state

KEY_ENV = settings.MODEL_SIGNING_KEY
"""Environment variable naming the private key file (overrides :data:`DEFAULT_KEY_PATH`)."""
DEFAULT_KEY_PATH = Path(".flowpin") / "keys" / "model-signing.key"
"""The private key, relative to the project root (``.flowpin/`` is gitignored)."""
TRUST_DIR = Path("keys") / "model-signing"
"""Trusted public keys, relative to the project root: ``<keyid>.pem``."""
SIGNATURES_DIR = "model-signatures"
"""Default home of signatures of checkpoints in a run's ``checkpoints/`` directory (beside it)."""
SIGNATURE_SUFFIX = ".sig"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
CURVE = "secp256r1"
"""The one curve accepted (NIST P-256)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyInfo:
    """A model-signing private key on disk and where its public key is trusted."""

    path: Path
    """The private key file."""
    keyid: str
    """sha256 hex of the public key's PEM SubjectPublicKeyInfo (model-signing's key hint)."""
    public_path: Path
    """``keys/model-signing/<keyid>.pem`` under the project root (may not exist yet)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SignedCheckpoint:
    """What signing or verifying established."""

    checkpoint: Path
    """The checkpoint directory."""
    signature: Path
    """The Sigstore bundle."""
    keyid: str
    """The key that signed (and, for verify, that verified)."""
    public_key: Path
    """The trusted public key file of :attr:`keyid`."""
    files: Mapping[str, str]
    """Relative file name -> sha256, as signed (and equal to ``state.json``'s records)."""

    def openssf_command(self) -> str:
        """The ``model_signing verify key`` command line that checks this signature without flowpin.

        ``--no-ignore-git-paths``: by default the OpenSSF tool skips ``.git*`` files in the model
        directory, so a ``.gitignore`` dropped into the checkpoint after signing would pass it.
        """
        return shlex.join(
            [
                "model_signing",
                "verify",
                "key",
                "--signature",
                _shown(self.signature),
                "--public_key",
                _shown(self.public_key),
                "--no-ignore-git-paths",
                _shown(self.checkpoint),
            ]
        )


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands to copy)."""
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# --- keys -----------------------------------------------------------------------------------------


def keyid_of(public: ec.EllipticCurvePublicKey) -> str:
    """sha256 hex of the PEM SubjectPublicKeyInfo: the hint model-signing writes into its bundles."""
    return hashlib.sha256(_public_pem(public)).hexdigest()


def _public_pem(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def default_key_path(root: Path) -> Path:
    """``$FLOWPIN_MODEL_SIGNING_KEY`` or ``<root>/.flowpin/keys/model-signing.key``."""
    env = Settings.from_env().model_signing_key
    return Path(env) if env else root / DEFAULT_KEY_PATH


def _info(root: Path, path: Path, public: ec.EllipticCurvePublicKey) -> KeyInfo:
    keyid = keyid_of(public)
    return KeyInfo(path=path, keyid=keyid, public_path=root / TRUST_DIR / f"{keyid}.pem")


def init_key(root: Path, *, key_path: Path | None = None, force: bool = False) -> KeyInfo:
    """Create an EC P-256 private key (0600, atomically) and trust its public key in ``keys/model-signing/``.

    Without ``force`` the private key is created exclusively: of two concurrent calls one creates it and
    the other raises, so no key is lost and only the surviving key is trusted.
    """
    path = key_path or default_key_path(root)
    info = None if path.exists() and not force else _create_key(root, path, force=force)
    if info is None:
        raise ModelSigningKeyError(
            f"{path} already exists; use it, or pass --force to replace it (signatures it made stay valid as "
            "long as its public key stays in keys/model-signing/)"
        )
    return info


def init_key_if_missing(root: Path, key_path: Path | None = None) -> tuple[KeyInfo, bool, bool]:
    """The model-signing key, created unless one exists; ``(info, created, trusted_now)``.

    Safe to run concurrently: exactly one caller creates the key, the others load it. An existing key
    whose public key is missing from ``keys/model-signing/`` (a key init killed in between) is trusted now.
    """
    path = key_path or default_key_path(root)
    if not path.exists():
        created = _create_key(root, path, force=False)
        if created is not None:
            return created, True, True
    info, private = load_private_key(root, path)
    if info.public_path.is_file():
        return info, False, False
    trust_public_key(root, _public_pem(private.public_key()))
    return info, False, True


def _create_key(root: Path, path: Path, *, force: bool) -> KeyInfo | None:
    """Write a new private key (0600) to ``path`` and trust its public key; None if ``path`` was taken."""
    private = ec.generate_private_key(ec.SECP256R1())
    if not publish_private_key(path, private, force=force):
        return None  # another process created the key first: its key is the one, ours was never published
    info = _info(root, path, private.public_key())
    trust_public_key(root, _public_pem(private.public_key()))
    return info


def trust_public_key(root: Path, pem: bytes) -> Path:
    """Add an EC P-256 PEM public key to ``keys/model-signing/`` as ``<keyid>.pem``; returns its path."""
    public = _load_public(pem, "<given key>")
    target = root / TRUST_DIR / f"{keyid_of(public)}.pem"
    atomic_write_bytes(target, _public_pem(public))
    return target


def load_private_key(root: Path, key_path: Path | None = None) -> tuple[KeyInfo, ec.EllipticCurvePrivateKey]:
    """The model-signing private key, refused when group/world-accessible, encrypted, or not EC P-256."""
    path = key_path or default_key_path(root)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise ModelSigningKeyError(
            f"no model-signing key at {path}; create one with `flowpin model-sign key init` "
            f"(or point {KEY_ENV} at an EC P-256 PKCS#8 PEM key)"
        ) from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ModelSigningKeyError(
            f"model-signing key {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(_read_key(path, "model-signing key"), password=None)
    except (ValueError, TypeError) as exc:
        raise ModelSigningKeyError(
            f"{path} is not an unencrypted PEM private key ({exc}); recreate it with "
            "`flowpin model-sign key init --force`"
        ) from exc
    except OSError as exc:
        raise ModelSigningKeyError(f"cannot read model-signing key {path}: {exc.strerror or exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE:
        raise ModelSigningKeyError(
            f"{path} holds {_describe_key(key)}; OpenSSF model signing here uses EC P-256 keys only (flowpin's "
            "Ed25519 key signs manifests, not checkpoints) -- create one with `flowpin model-sign key init`"
        )
    return _info(root, path, key.public_key()), key


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an EC key on curve {key.curve.name}"
    return f"a {type(key).__name__}"


MAX_KEY_BYTES = 64 << 10
"""Largest key file read (a PEM EC key is a few hundred bytes)."""
MAX_BUNDLE_BYTES = 64 << 20
"""Largest signature bundle read (one digest per checkpoint file: a few KiB)."""


def _read_key(path: Path, what: str) -> bytes:
    """A key file's bytes: a regular file of at most :data:`MAX_KEY_BYTES` (never a FIFO or a device)."""
    return read_regular(path, max_bytes=MAX_KEY_BYTES, what=what, fix="replace it with the PEM key file or remove it")


def _load_public(pem: bytes, where: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ModelSigningKeyError(f"{where} is not a PEM public key ({exc}); remove it or replace it") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE:
        raise ModelSigningKeyError(
            f"{where} holds {_describe_key(key)}; {TRUST_DIR}/ trusts EC P-256 keys only (Ed25519 manifest keys "
            "belong in keys/*.pub) -- remove it"
        )
    return key


def load_trusted_keys(root: Path) -> dict[str, Path]:
    """keyid -> file for every ``keys/model-signing/*.pem``; each must be EC P-256 and named by its keyid."""
    directory = root / TRUST_DIR
    trusted: dict[str, Path] = {}
    for path in sorted(directory.glob("*.pem")) if directory.is_dir() else []:
        try:
            pem = _read_key(path, "trusted model-signing key")
        except OSError as exc:
            raise ModelSigningKeyError(f"cannot read trusted key {path}: {exc.strerror or exc}") from exc
        keyid = keyid_of(_load_public(pem, str(path)))
        if path.name != f"{keyid}.pem":
            raise ModelSigningKeyError(
                f"{path} holds the key with keyid {keyid}; rename it to {keyid}.pem (the file name is how "
                "a signature's key hint finds its key)"
            )
        trusted[keyid] = path
    return trusted


# --- checkpoint -----------------------------------------------------------------------------------


def default_signature_path(checkpoint: Path) -> Path:
    """Where a checkpoint's signature goes unless told: outside the (DVC-tracked) checkpoint directory.

    ``runs/pretrain/checkpoints/step-000100`` -> ``runs/pretrain/model-signatures/step-000100.sig``
    (beside the ``checkpoints/`` DVC output, so ``dvc status`` stays clean); any other directory
    ``D`` -> ``D.sig`` beside it.
    """
    ck = checkpoint if checkpoint.name not in ("", ".", "..") else checkpoint.resolve()
    if ck.parent.name == CHECKPOINTS_DIR:
        return ck.parent.parent / SIGNATURES_DIR / f"{ck.name}{SIGNATURE_SUFFIX}"
    return ck.with_name(ck.name + SIGNATURE_SUFFIX)


def checkpoint_files(checkpoint: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file of a checkpoint whose integrity flowpin has just checked.

    Every tensor file must match the size and sha256 ``state.json`` records (:func:`read_state`), and the
    directory must hold nothing else: no extra file, subdirectory or symlink (a signature would cover it,
    but no loader would read it). ``state.json``'s own digest is that of the bytes read here.
    """
    if not checkpoint.is_dir():
        raise ModelSigningInputError(f"no checkpoint directory at {checkpoint}; name a step-NNNNNN directory")
    state = read_state(checkpoint, verify_files=True)
    raw = read_regular(checkpoint / STATE_FILE, max_bytes=MAX_STATE_BYTES, what="checkpoint file")
    if state.source is None or state.source.state_sha256 != hashlib.sha256(raw).hexdigest():
        raise CheckpointError(f"{checkpoint / STATE_FILE}: changed while it was being checked; retry")
    files = loads_strict(raw, where=str(checkpoint / STATE_FILE), max_bytes=MAX_STATE_BYTES)["files"]
    expected = {name: str(entry["sha256"]) for name, entry in files.items()}
    expected[STATE_FILE] = state.source.state_sha256
    for child in sorted(checkpoint.iterdir()):
        if child.name not in expected or child.is_symlink() or not child.is_file():
            raise CheckpointError(
                f"{child}: not part of a flowpin checkpoint (which holds {', '.join(sorted(expected))}); "
                "move it out of the checkpoint directory"
            )
    return expected


def check_tensor_files(checkpoint: Path, expected: Mapping[str, str]) -> None:
    """Validate the header and offsets of every ``*.safetensors`` file of a checked checkpoint.

    ``state.json`` is not signed, so a crafted tensor file re-pinned there passes :func:`checkpoint_files`;
    :func:`flowpin.tensorfile.validate_safetensors` is what flowpin's loader holds it to, and a checkpoint
    that loader would refuse must not be signed. The bytes validated must still have the sha256 in
    ``expected`` (what is then signed and cross-checked), so a file swapped meanwhile is refused too.
    """
    for name in sorted(expected):
        if not name.endswith(".safetensors"):
            continue
        path = checkpoint / name
        data = path.read_bytes()  # checkpoint_files: a regular file of the checkpoint, no symlink
        if hashlib.sha256(data).hexdigest() != expected[name]:
            raise CheckpointError(f"{path}: changed while it was being checked; retry")
        validate_safetensors(
            data,
            where=str(path),
            fix="flowpin's loader would refuse this checkpoint, so it is not signed -- restore it or sign an "
            "earlier checkpoint",
        )


# --- bundle ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bundle:
    """The parts of a model-signing Sigstore bundle flowpin reads (after model-signing verified it)."""

    key_hint: str | None
    """``verificationMaterial.publicKey.hint`` (the signer's keyid), if present."""
    statement: Mapping[str, Any]
    """The decoded in-toto statement."""

    def resources(self) -> dict[str, tuple[str, str]]:
        """Resource name -> (algorithm, digest) of the signed statement."""
        out: dict[str, tuple[str, str]] = {}
        for item in self.statement.get("predicate", {}).get("resources", []):
            out[str(item.get("name"))] = (str(item.get("algorithm")), str(item.get("digest")))
        return out


def parse_bundle(data: bytes, where: str) -> Bundle:
    """Decode a model-signing bundle's key hint and statement; structure only, no signature check."""
    fix = "re-sign the checkpoint with `flowpin model-sign sign` or restore the signature file"
    try:
        document = loads_strict(data, where=where, max_bytes=MAX_BUNDLE_BYTES)
        if document["mediaType"] != BUNDLE_MEDIA_TYPE:
            raise ModelSignatureFormatError(
                f"{where}: media type {document['mediaType']!r}, expected {BUNDLE_MEDIA_TYPE!r}; {fix}"
            )
        public_key = document["verificationMaterial"].get("publicKey") or {}
        hint = public_key.get("hint") or None
        envelope = document["dsseEnvelope"]
        if envelope["payloadType"] != PAYLOAD_TYPE:
            raise ModelSignatureFormatError(f"{where}: DSSE payload type {envelope['payloadType']!r}; {fix}")
        payload = base64.b64decode(envelope["payload"], validate=True)
        statement = loads_strict(payload, where=f"{where}: payload", max_bytes=MAX_BUNDLE_BYTES)
    except ModelSignatureFormatError:
        raise
    except (StrictJSONError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ModelSignatureFormatError(
            f"{where}: not a model-signing Sigstore bundle ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise ModelSignatureFormatError(f"{where}: the DSSE payload is not an in-toto Statement v1; {fix}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise ModelSignatureFormatError(
            f"{where}: predicateType {statement.get('predicateType')!r}, expected {PREDICATE_TYPE!r}; {fix}"
        )
    return Bundle(key_hint=hint if isinstance(hint, str) else None, statement=statement)


def _cross_check(bundle: Bundle, expected: Mapping[str, str], where: str) -> None:
    """The signed statement lists exactly the checkpoint's files, with the sha256 ``state.json`` records."""
    signed = bundle.resources()
    problems = []
    for name in sorted(set(signed) | set(expected)):
        if name not in expected:
            problems.append(f"{name} is signed but not part of the checkpoint")
        elif name not in signed:
            problems.append(f"{name} is part of the checkpoint but not signed")
        elif signed[name] != ("sha256", expected[name]):
            problems.append(f"{name} is signed as {signed[name][0]}:{signed[name][1]}, state.json has {expected[name]}")
    if problems:
        raise ModelSignatureMismatchError(
            f"{where}: the signed statement and the checkpoint's state.json disagree: {'; '.join(problems)}; "
            "re-sign the checkpoint with `flowpin model-sign sign`"
        )


# --- sign / verify --------------------------------------------------------------------------------


def _hashing_config() -> Any:
    """model-signing's file serialization with sha256 and nothing ignored (``.gitignore`` & co. included)."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)


def sign_checkpoint(
    checkpoint: Path, *, root: Path, signature: Path | None = None, key_path: Path | None = None
) -> SignedCheckpoint:
    """Sign a checkpoint directory in the OpenSSF model-signing format (see the module docstring)."""
    from model_signing import signing

    sig_path = signature or default_signature_path(checkpoint)
    if checkpoint.is_dir() and sig_path.resolve().is_relative_to(checkpoint.resolve()):
        raise ModelSigningInputError(
            f"signature {sig_path} would be inside the checkpoint {checkpoint}, changing what is signed (and the "
            "DVC output's digest); pass --signature outside it, or leave it out for the default"
        )
    info, _ = load_private_key(root, key_path)
    trusted = load_trusted_keys(root)
    if info.keyid not in trusted:
        raise ModelSigningKeyError(
            f"the public key of {info.path} (keyid {info.keyid}) is not in {TRUST_DIR}/, so nobody could check "
            f"what it signs; add it: `openssl pkey -in {info.path} -pubout -out {info.public_path}`"
        )
    expected = checkpoint_files(checkpoint)  # a damaged checkpoint is never signed
    check_tensor_files(checkpoint, expected)  # nor a crafted one re-pinned in state.json
    with tempfile.TemporaryDirectory(prefix="flowpin-modelsign-") as tmp:
        out = Path(tmp) / "bundle.sig"
        try:
            signing.Config().use_elliptic_key_signer(private_key=info.path).set_hashing_config(_hashing_config()).sign(
                checkpoint, out
            )
            data = out.read_bytes()
        except (ValueError, OSError) as exc:
            raise ModelSigningError(
                f"model-signing could not sign {checkpoint}: {type(exc).__name__}: {exc}; check that the "
                "directory holds only regular files and is readable"
            ) from exc
    bundle = parse_bundle(data, f"signature of {checkpoint}")
    try:
        _cross_check(bundle, expected, str(checkpoint))
    except ModelSignatureMismatchError as exc:
        raise ModelSigningError(
            f"{exc} -- the checkpoint changed while it was being signed; nothing was written"
        ) from exc
    atomic_write_bytes(sig_path, data)
    return SignedCheckpoint(
        checkpoint=checkpoint, signature=sig_path, keyid=info.keyid, public_key=trusted[info.keyid], files=expected
    )


def verify_checkpoint(checkpoint: Path, *, root: Path, signature: Path | None = None) -> SignedCheckpoint:
    """Check a checkpoint against its model-signing signature and ``keys/model-signing/``.

    Raises :class:`ModelSigningInputError` (no checkpoint / no signature), :class:`ModelSigningKeyError`
    (no or bad trusted keys), or on a failed verification a :class:`ModelSignatureError` subclass
    (format, untrusted key, bad signature, files changed/added/removed) or a checkpoint
    :class:`~flowpin.errors.IntegrityError` from flowpin's own check.
    """
    from model_signing import verifying

    sig_path = signature or default_signature_path(checkpoint)
    if not checkpoint.is_dir():
        raise ModelSigningInputError(f"no checkpoint directory at {checkpoint}; name a step-NNNNNN directory")
    try:
        data = read_regular(sig_path, max_bytes=MAX_BUNDLE_BYTES, what="model-signing signature")
    except FileNotFoundError as exc:
        raise ModelSigningInputError(
            f"no signature at {sig_path}; sign the checkpoint with `flowpin model-sign sign {checkpoint}`, or pass "
            "--signature with where it is"
        ) from exc
    except OSError as exc:
        raise ModelSigningInputError(f"cannot read signature {sig_path}: {exc.strerror or exc}") from exc
    trusted = load_trusted_keys(root)
    if not trusted:
        raise ModelSigningKeyError(
            f"no trusted model-signing keys in {root / TRUST_DIR}/; add the signer's public key there as <keyid>.pem"
        )
    where = f"{sig_path} (signature of {checkpoint})"
    bundle = parse_bundle(data, where)
    if bundle.key_hint is not None and bundle.key_hint not in trusted:
        raise UntrustedModelKeyError(
            f"{where}: signed by key {bundle.key_hint}, which is not in {TRUST_DIR}/ (trusted: "
            f"{', '.join(trusted)}); add the signer's public key there if you trust it"
        )
    candidates = [bundle.key_hint] if bundle.key_hint is not None else sorted(trusted)
    failures = []
    with tempfile.TemporaryDirectory(prefix="flowpin-modelsign-") as tmp:
        copy = Path(tmp) / "bundle.sig"  # model-signing verifies exactly the bytes parsed above
        copy.write_bytes(data)
        for keyid in candidates:
            try:
                verifying.Config().use_elliptic_key_verifier(public_key=trusted[keyid]).set_hashing_config(
                    _hashing_config()
                ).verify(checkpoint, copy)
            except InvalidSignature:
                failures.append(f"{keyid}: the ECDSA signature does not verify")
                continue
            except ValueError as exc:
                message = str(exc)
                if message.startswith("Signature mismatch"):
                    raise ModelSignatureMismatchError(
                        f"{checkpoint}: its files differ from what {where} signed (key {keyid}): "
                        f"{message.removeprefix('Signature mismatch: ')}; restore the checkpoint, or re-sign it if "
                        "the change is intended"
                    ) from exc
                if message.startswith("Key mismatch"):
                    failures.append(f"{keyid}: not the signing key")
                    continue
                raise ModelSignatureError(f"{where}: model-signing refused it: {message}") from exc
            except (KeyError, TypeError, AttributeError, OSError) as exc:
                raise ModelSignatureFormatError(
                    f"{where}: model-signing could not read it ({type(exc).__name__}: {exc}); re-sign the checkpoint"
                ) from exc
            expected = checkpoint_files(checkpoint)
            check_tensor_files(checkpoint, expected)
            _cross_check(bundle, expected, where)
            return SignedCheckpoint(
                checkpoint=checkpoint, signature=sig_path, keyid=keyid, public_key=trusted[keyid], files=expected
            )
    error = BadModelSignatureError if bundle.key_hint is not None else UntrustedModelKeyError
    raise error(
        f"{where}: no trusted key verifies it ({'; '.join(failures)}); the signature file was changed or made "
        f"with a key not in {TRUST_DIR}/ -- restore it or re-sign the checkpoint"
    )


__all__ = [
    "DEFAULT_KEY_PATH",
    "KEY_ENV",
    "PREDICATE_TYPE",
    "TRUST_DIR",
    "Bundle",
    "KeyInfo",
    "SignedCheckpoint",
    "check_tensor_files",
    "checkpoint_files",
    "default_key_path",
    "default_signature_path",
    "init_key",
    "init_key_if_missing",
    "keyid_of",
    "load_private_key",
    "load_trusted_keys",
    "parse_bundle",
    "sign_checkpoint",
    "trust_public_key",
    "verify_checkpoint",
]
