"""Ed25519 keys and DSSE envelopes.

* **Envelope** (DSSE v1): ``{"payloadType", "payload": base64(body), "signatures": [{"keyid", "sig"}]}``.
  Signatures are over the pre-authentication encoding ``PAE(type, body) = "DSSEv1" SP len(type) SP type
  SP len(body) SP body`` (lengths as ASCII decimal byte counts), never over the raw payload.
* **Keys**: Ed25519 only; a signature is accepted only from an Ed25519 public key (no algorithm is read
  from the envelope, so no algorithm confusion). ``keyid`` = lowercase hex sha256 of the 32 raw public
  key bytes.
* **Private key**: PKCS#8 PEM, created with mode 0600 (``flowpin key init``); refused when group- or
  world-accessible. Default location ``.flowpin/keys/signing.key`` (gitignored); ``FLOWPIN_SIGNING_KEY``
  overrides it.
* **Trust store**: the committed ``keys/`` directory; every ``*.pub`` file in it is a PEM
  SubjectPublicKeyInfo Ed25519 key that flowpin trusts, named ``<keyid>.pub`` (any other name is
  refused, so a review of ``keys/`` sees which key it trusts). Extra directories (``verify --trust``)
  may name their files freely.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from flowpin.atomic import atomic_create_exclusive, atomic_write_bytes
from flowpin.errors import (
    ArtifactUnreadableError,
    BadSignatureError,
    KeyFileError,
    MissingSignatureError,
    UntrustedKeyError,
)
from flowpin.failpoints import failpoint
from flowpin.safeio import read_regular
from flowpin.settings import Settings

PAYLOAD_TYPE = "application/vnd.in-toto+json"
TRUST_DIR = "keys"
DEFAULT_KEY_PATH = Path(".flowpin") / "keys" / "signing.key"


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def keyid_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclasses.dataclass(frozen=True)
class Signer:
    """An Ed25519 private key and its keyid."""

    private: Ed25519PrivateKey
    keyid: str

    def sign(self, payload_type: str, body: bytes) -> dict[str, object]:
        """A DSSE envelope over ``body`` signed with this key."""
        sig = self.private.sign(pae(payload_type, body))
        return {
            "payloadType": payload_type,
            "payload": base64.b64encode(body).decode("ascii"),
            "signatures": [{"keyid": self.keyid, "sig": base64.b64encode(sig).decode("ascii")}],
        }

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def default_key_path(root: Path) -> Path:
    env = Settings.from_env().signing_key
    return Path(env) if env else root / DEFAULT_KEY_PATH


def init_key(root: Path, *, key_path: Path | None = None, force: bool = False) -> Signer:
    """Create a new signing key (0600) and add its public key to the trust store ``keys/``.

    The private key is published first, then its public key: a crash between the two leaves a key that
    :func:`ensure_trusted` (``flowpin key init --if-missing``) completes. Without ``force`` the private
    key is created exclusively (:func:`~flowpin.atomic.atomic_create_exclusive`): of two concurrent
    calls one creates it and the other raises, so no key is lost and only the surviving key is trusted.
    """
    path = key_path or default_key_path(root)
    signer = None if path.exists() and not force else _create_key(root, path, force=force)
    if signer is None:
        raise KeyFileError(f"{path} already exists; use it, or pass --force to replace it (old signatures stay valid)")
    return signer


def init_key_if_missing(root: Path, key_path: Path | None = None) -> tuple[Signer, bool, bool]:
    """The signing key, created unless one exists; ``(signer, created, trusted_now)``.

    Safe to run concurrently (``flowpin key init --if-missing`` from several shells or jobs at once):
    exactly one caller creates the key; the others load that key and see ``created`` False. An existing
    key whose public key is not trusted yet is trusted now (see :func:`ensure_trusted`).
    """
    path = key_path or default_key_path(root)
    if not path.exists():
        signer = _create_key(root, path, force=False)
        if signer is not None:
            return signer, True, True
    signer, added = ensure_trusted(root, path)
    return signer, False, added


def _create_key(root: Path, path: Path, *, force: bool) -> Signer | None:
    """Write a new private key (0600) to ``path`` and trust its public key; None if ``path`` was taken."""
    private = Ed25519PrivateKey.generate()
    if not publish_private_key(path, private, force=force):
        return None  # another process created the key first: its key is the one, ours was never published
    failpoint("key.after-private", str(path))
    signer = Signer(private, keyid_of(private.public_key()))
    trust_public_key(root, signer.public_pem())
    return signer


def publish_private_key(path: Path, private: PrivateKeyTypes, *, force: bool) -> bool:
    """Write ``private`` as unencrypted PKCS#8 PEM (mode 0600, directory 0700) to ``path``; False if ``path`` was
    taken. ``force`` replaces an existing key atomically; otherwise the key is created exclusively
    (:func:`~flowpin.atomic.atomic_create_exclusive`), so of concurrent callers exactly one publishes."""
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if force:
        atomic_write_bytes(path, pem, mode=0o600)
        return True
    return atomic_create_exclusive(path, pem, mode=0o600)


def ensure_trusted(root: Path, key_path: Path | None = None) -> tuple[Signer, bool]:
    """Load the existing signing key and make sure its public key is in ``keys/``; (signer, added).

    Repairs what a ``key init`` killed between writing the private key and trusting its public key
    leaves behind: a key whose manifests would never verify.
    """
    signer = load_signer(root, key_path)
    if signer.keyid in load_trust_store(root):
        return signer, False
    trust_public_key(root, signer.public_pem())
    return signer, True


def trust_public_key(root: Path, pem: bytes) -> Path:
    """Add a PEM public key to ``keys/`` as ``<keyid>.pub``; returns its path."""
    public = _load_public(pem, "<given key>")
    target = root / TRUST_DIR / f"{keyid_of(public)}.pub"
    atomic_write_bytes(target, pem)
    return target


def load_signer(root: Path, key_path: Path | None = None) -> Signer:
    """Load the private signing key, refusing unsafe permissions and non-Ed25519 keys."""
    path = key_path or default_key_path(root)
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"no signing key at {path}; create one with `flowpin key init`") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"signing key {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{path} is not an unencrypted PEM private key ({exc}); recreate with `flowpin key init`"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{path} holds a {type(key).__name__}; flowpin signs with Ed25519 keys only -- create one with "
            "`flowpin key init --force`"
        )
    return Signer(key, keyid_of(key.public_key()))


def _load_public(pem: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{where} is not a PEM public key ({exc}); replace it with the signer's Ed25519 public key or remove it"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        # Bound to the algorithm here, never by the envelope: an EC or RSA key (e.g. an OpenSSF model-signing
        # key, kept in keys/model-signing/) must not be able to vouch for a manifest.
        raise KeyFileError(
            f"{where} holds a {type(key).__name__}; flowpin trusts Ed25519 keys only for manifests -- remove it "
            f"from {TRUST_DIR}/ (model-signing keys belong in {TRUST_DIR}/model-signing/)"
        )
    return key


MAX_PUBLIC_KEY_BYTES = 64 << 10
"""Largest trusted key file read (a PEM Ed25519 public key is 113 bytes)."""


def load_trust_store(root: Path, extra_dirs: tuple[Path, ...] = ()) -> dict[str, Ed25519PublicKey]:
    """keyid → public key for every ``*.pub`` under ``keys/`` (and any extra directories)."""
    store: dict[str, Ed25519PublicKey] = {}
    for directory in (root / TRUST_DIR, *extra_dirs):
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.pub")):
            try:  # a regular file only: a FIFO or a device named *.pub would hang or exhaust memory
                pem = read_regular(path, max_bytes=MAX_PUBLIC_KEY_BYTES, what="trusted key")
            except OSError as exc:
                raise KeyFileError(
                    f"cannot read trusted key {path} ({exc.strerror or exc}); make it a readable PEM file or remove it"
                ) from exc
            except ArtifactUnreadableError as exc:  # not a regular file, or too large for a key
                raise KeyFileError(f"{exc}; make it a readable PEM file or remove it") from exc
            key = _load_public(pem, str(path))
            keyid = keyid_of(key)
            if directory == root / TRUST_DIR and path.name != f"{keyid}.pub":
                # The name is what a reviewer of a change to keys/ sees: it must say which key is trusted.
                raise KeyFileError(
                    f"{path} holds the Ed25519 key {keyid}, but a trusted key's file is named by its keyid; "
                    f"rename it: `git mv {TRUST_DIR}/{path.name} {TRUST_DIR}/{keyid}.pub` (or remove it if you "
                    "do not trust that key)"
                )
            store[keyid] = key
    return store


def decode_b64(text: object, where: str) -> bytes:
    """Strict base64 (standard alphabet, padding required)."""
    from flowpin.errors import ManifestParseError

    if not isinstance(text, str):
        raise ManifestParseError(f"{where} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ManifestParseError(
            f"{where} is not valid base64 ({exc}); the envelope is corrupt or truncated -- restore it from git or "
            "re-run its stage"
        ) from exc


def verify_envelope(envelope: dict[str, object], trusted: dict[str, Ed25519PublicKey], where: str) -> str:
    """Check that a trusted key signed this envelope; returns the keyid that verified.

    Threshold 1: one valid signature by a trusted key suffices. A signature whose keyid is trusted but
    which does not verify is an error even if another one verifies: a trusted key never signs garbage.
    """
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise MissingSignatureError(f"{where}: envelope has no signatures; sign it with `flowpin` (record)")
    payload_type = envelope.get("payloadType")
    if not isinstance(payload_type, str):
        raise BadSignatureError(f"{where}: payloadType missing")
    try:
        payload_type.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800") has no bytes to sign over
        raise BadSignatureError(
            f"{where}: payloadType is not valid Unicode ({exc.reason}); no signature can cover it"
        ) from exc
    body = decode_b64(envelope.get("payload"), f"{where}: payload")
    message = pae(payload_type, body)
    verified: str | None = None
    seen: list[str] = []
    for i, entry in enumerate(signatures):
        if not isinstance(entry, dict):
            raise BadSignatureError(f"{where}: signatures[{i}] is not an object")
        keyid = entry.get("keyid")
        seen.append(str(keyid))
        if not isinstance(keyid, str) or keyid not in trusted:
            continue
        key = trusted[keyid]
        sig = decode_b64(entry.get("sig"), f"{where}: signatures[{i}].sig")
        try:
            key.verify(sig, message)
        except InvalidSignature as exc:
            raise BadSignatureError(
                f"{where}: signature by trusted key {keyid[:16]}… does not verify — the payload or its type "
                "was changed after signing; restore the original or re-run the stage"
            ) from exc
        verified = keyid
    if verified is None:
        raise UntrustedKeyError(
            f"{where}: signed by {', '.join(k[:16] + '…' for k in seen)}, none of which is in the trust store "
            f"({TRUST_DIR}/); add the signer's public key there if you trust it"
        )
    return verified
