"""Interoperability: flowpin envelopes verify with securesystemslib's DSSE code, and the reverse.

securesystemslib is an independent DSSE implementation (the one in-toto and TUF use), so agreement
with it checks PAE, base64 and keyid handling against the spec rather than against ourselves.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from flowpin.canonical import canonical_json
from flowpin.errors import BadSignatureError
from flowpin.signing import PAYLOAD_TYPE, keyid_of, trust_public_key, verify_envelope
from helpers import Project


def sslib_key(private: Ed25519PrivateKey, keyid: str) -> SSlibKey:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SSlibKey(keyid, "ed25519", "ed25519", {"public": raw.hex()})


def sslib_envelope(envelope: dict[str, Any]) -> Envelope:
    return Envelope.from_dict(copy.deepcopy(envelope))  # from_dict rewrites the signature dicts in place


@pytest.fixture
def manifest_envelope(project: Project) -> dict[str, Any]:
    path = project.record_stage("train")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_flowpin_envelope_verifies_with_securesystemslib(project: Project, manifest_envelope: Any) -> None:
    key = sslib_key(project.signer.private, project.signer.keyid)
    accepted = sslib_envelope(manifest_envelope).verify([key], 1)
    assert list(accepted) == [project.signer.keyid]


def test_securesystemslib_rejects_tampered_flowpin_payload(project: Project, manifest_envelope: Any) -> None:
    statement = json.loads(base64.b64decode(manifest_envelope["payload"]))
    statement["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["lr"] = 0.2
    tampered = {**manifest_envelope, "payload": base64.b64encode(json.dumps(statement).encode()).decode()}
    key = sslib_key(project.signer.private, project.signer.keyid)
    with pytest.raises(VerificationError):
        sslib_envelope(tampered).verify([key], 1)


def test_securesystemslib_rejects_flowpin_envelope_under_another_key(project: Project, manifest_envelope: Any) -> None:
    other = sslib_key(Ed25519PrivateKey.generate(), project.signer.keyid)  # right keyid, wrong key
    with pytest.raises(VerificationError):
        sslib_envelope(manifest_envelope).verify([other], 1)


def test_securesystemslib_envelope_verifies_with_flowpin(project: Project) -> None:
    private = Ed25519PrivateKey.generate()
    keyid = keyid_of(private.public_key())
    signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key(), keyid=keyid))
    body = b'{"_type":"https://in-toto.io/Statement/v1"}'
    envelope = Envelope(body, PAYLOAD_TYPE, {})
    envelope.sign(signer)
    as_dict = envelope.to_dict()

    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    trust_public_key(project.root, pem)
    trusted = project.trusted()
    assert verify_envelope(as_dict, trusted, "sslib") == keyid

    as_dict["payload"] = base64.b64encode(body.replace(b"v1", b"v2")).decode()
    with pytest.raises(BadSignatureError):
        verify_envelope(as_dict, trusted, "sslib")


def test_statement_types_follow_in_toto_and_slsa(project: Project, manifest_envelope: Any) -> None:
    assert manifest_envelope["payloadType"] == "application/vnd.in-toto+json"
    statement = json.loads(base64.b64decode(manifest_envelope["payload"], validate=True))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    build = statement["predicate"]["buildDefinition"]
    assert set(build) == {"buildType", "externalParameters", "internalParameters", "resolvedDependencies"}
    assert {"builder", "metadata", "byproducts"} <= set(statement["predicate"]["runDetails"])
    for subject in statement["subject"]:  # flowpin's identity, and what a verifier of the bytes checks
        standard = "sha256" if subject["annotations"]["flowpin.type"] == "file" else "dirHash"
        assert set(subject["digest"]) == {"flowpinSha256", standard}
        assert all(len(v) == 64 for v in subject["digest"].values())
    for byproduct in statement["predicate"]["runDetails"]["byproducts"]:  # in-toto: digest, uri or content
        assert {"digest", "uri", "content"} & set(byproduct), byproduct


def test_payload_is_canonical_json(project: Project) -> None:
    path = project.record_stage("train")
    body = base64.b64decode(json.loads(path.read_text())["payload"])
    assert canonical_json(json.loads(body)) == body
