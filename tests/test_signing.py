"""Tests for flowpin.signing: DSSE PAE bytes, Ed25519 key files, trust store and envelope checks."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flowpin.errors import (
    BadSignatureError,
    KeyFileError,
    ManifestParseError,
    MissingSignatureError,
    UntrustedKeyError,
)
from flowpin.signing import (
    PAYLOAD_TYPE,
    Signer,
    init_key,
    keyid_of,
    load_signer,
    load_trust_store,
    pae,
    trust_public_key,
    verify_envelope,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    (r / ".dvc").mkdir(parents=True)
    return r


def _signer() -> Signer:
    key = Ed25519PrivateKey.generate()
    return Signer(key, keyid_of(key.public_key()))


# --- PAE ----------------------------------------------------------------------------------------------


def test_pae_bytes_exact() -> None:
    # "DSSEv1" SP len(type) SP type SP len(body) SP body; application/vnd.in-toto+json is 28 bytes.
    assert len(PAYLOAD_TYPE) == 28
    assert pae(PAYLOAD_TYPE, b"{}") == b"DSSEv1 28 application/vnd.in-toto+json 2 {}"
    assert pae("", b"") == b"DSSEv1 0  0 "


def test_pae_counts_bytes_not_characters() -> None:
    body = "é".encode()  # 1 character, 2 bytes
    assert pae("t/é", body) == b"DSSEv1 4 t/\xc3\xa9 2 \xc3\xa9"


def test_pae_example_from_dsse_spec() -> None:
    # the worked example of the DSSE v1 protocol document
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


# --- keys ---------------------------------------------------------------------------------------------


def test_init_key_creates_0600_private_key_and_trusted_public_key(root: Path) -> None:
    key_path = root / ".flowpin" / "keys" / "signing.key"
    signer = init_key(root, key_path=key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = load_signer(root, key_path)
    assert loaded.keyid == signer.keyid
    pubs = list((root / "keys").glob("*.pub"))
    assert [p.name for p in pubs] == [f"{signer.keyid}.pub"]
    assert set(load_trust_store(root)) == {signer.keyid}


def test_init_key_refuses_to_overwrite(root: Path) -> None:
    key_path = root / "k.key"
    first = init_key(root, key_path=key_path)
    with pytest.raises(KeyFileError, match="already exists"):
        init_key(root, key_path=key_path)
    second = init_key(root, key_path=key_path, force=True)
    assert second.keyid != first.keyid
    assert set(load_trust_store(root)) == {first.keyid, second.keyid}  # old signatures stay valid


def test_keyid_is_sha256_of_raw_public_key() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert keyid_of(key.public_key()) == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_group_or_world_accessible_private_key(root: Path, mode: int) -> None:
    key_path = root / "k.key"
    init_key(root, key_path=key_path)
    key_path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signer(root, key_path)


def test_missing_private_key(root: Path) -> None:
    with pytest.raises(KeyFileError, match="flowpin key init"):
        load_signer(root, root / "absent.key")


def test_refuses_non_ed25519_private_key(root: Path) -> None:
    key_path = root / "ec.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path.write_bytes(pem)
    key_path.chmod(0o600)
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_signer(root, key_path)


def test_refuses_garbage_private_key(root: Path) -> None:
    key_path = root / "junk.key"
    key_path.write_bytes(b"not a key")
    key_path.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_signer(root, key_path)


def test_trust_store_refuses_non_ed25519_public_key(root: Path) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (root / "keys").mkdir()
    (root / "keys" / "ec.pub").write_bytes(pem)
    with pytest.raises(KeyFileError, match=r"ec\.pub"):
        load_trust_store(root)
    with pytest.raises(KeyFileError):
        trust_public_key(root, pem)


def test_trust_store_reads_extra_dirs(root: Path, tmp_path: Path) -> None:
    s = _signer()
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "x.pub").write_bytes(s.public_pem())
    assert load_trust_store(root) == {}
    assert set(load_trust_store(root, (extra,))) == {s.keyid}


# --- signatures and envelopes -------------------------------------------------------------------------


def test_signatures_are_deterministic() -> None:
    s = _signer()
    assert s.sign(PAYLOAD_TYPE, b'{"a":1}') == s.sign(PAYLOAD_TYPE, b'{"a":1}')
    assert s.sign(PAYLOAD_TYPE, b'{"a":1}') != s.sign(PAYLOAD_TYPE, b'{"a":2}')


def test_envelope_shape_and_signature_over_pae() -> None:
    s = _signer()
    body = b'{"hello":"world"}'
    env = s.sign(PAYLOAD_TYPE, body)
    assert set(env) == {"payloadType", "payload", "signatures"}
    assert base64.b64decode(env["payload"]) == body  # type: ignore[arg-type]
    signatures: Any = env["signatures"]
    assert len(signatures) == 1
    sig = signatures[0]
    assert sig["keyid"] == s.keyid
    raw_sig = base64.b64decode(sig["sig"])
    s.private.public_key().verify(raw_sig, b"DSSEv1 28 application/vnd.in-toto+json 17 " + body)
    assert verify_envelope(env, {s.keyid: s.private.public_key()}, "env") == s.keyid


def _tamper(env: dict[str, object], body: bytes) -> dict[str, object]:
    return {**env, "payload": base64.b64encode(body).decode()}


def test_verify_envelope_errors() -> None:
    s, other = _signer(), _signer()
    trusted = {s.keyid: s.private.public_key()}
    env = s.sign(PAYLOAD_TYPE, b'{"a":1}')
    with pytest.raises(BadSignatureError):
        verify_envelope(_tamper(env, b'{"a":2}'), trusted, "env")
    with pytest.raises(BadSignatureError):  # the type is signed too
        verify_envelope({**env, "payloadType": "application/json"}, trusted, "env")
    with pytest.raises(UntrustedKeyError):
        verify_envelope(other.sign(PAYLOAD_TYPE, b'{"a":1}'), trusted, "env")
    with pytest.raises(MissingSignatureError):
        verify_envelope({**env, "signatures": []}, trusted, "env")
    with pytest.raises(ManifestParseError):
        verify_envelope({**env, "payload": "not base64!"}, trusted, "env")


def test_signature_from_wrong_key_under_trusted_keyid_is_bad() -> None:
    s, forger = _signer(), _signer()
    trusted = {s.keyid: s.private.public_key()}
    forged = forger.sign(PAYLOAD_TYPE, b'{"a":1}')
    forged["signatures"] = [{"keyid": s.keyid, "sig": forged["signatures"][0]["sig"]}]  # type: ignore[index]
    with pytest.raises(BadSignatureError):
        verify_envelope(forged, trusted, "env")


def test_one_trusted_valid_signature_among_untrusted_ones_suffices() -> None:
    s, other = _signer(), _signer()
    body = b'{"a":1}'
    env = s.sign(PAYLOAD_TYPE, body)
    env["signatures"] = other.sign(PAYLOAD_TYPE, body)["signatures"] + env["signatures"]  # type: ignore[operator]
    assert verify_envelope(env, {s.keyid: s.private.public_key()}, "env") == s.keyid


def test_envelope_is_json_serialisable() -> None:
    env = _signer().sign(PAYLOAD_TYPE, b"{}")
    assert json.loads(json.dumps(env)) == env
