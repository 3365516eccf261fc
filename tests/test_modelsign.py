"""OpenSSF model signing of checkpoints: flowpin signs, the real ``model_signing`` CLI verifies (and fails).

The checkpoint is a real one (``save_checkpoint`` of a tiny trained model); every tamper case is checked
both with the OpenSSF tool alone (a subprocess, as an outside party would run it) and with flowpin.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from flowpin.cli import main
from flowpin.errors import (
    BadModelSignatureError,
    CheckpointCorruptError,
    CheckpointError,
    KeyFileError,
    ModelSignatureError,
    ModelSignatureFormatError,
    ModelSignatureMismatchError,
    ModelSigningInputError,
    ModelSigningKeyError,
    UntrustedModelKeyError,
)
from flowpin.modelsign import (
    KEY_ENV,
    PREDICATE_TYPE,
    TRUST_DIR,
    KeyInfo,
    default_signature_path,
    init_key,
    keyid_of,
    load_private_key,
    load_trusted_keys,
    sign_checkpoint,
    verify_checkpoint,
)
from flowpin.signing import load_signer, load_trust_store
from flowpin.train.checkpoint import DataPosition, TrainState, capture_rng, save_checkpoint

OPENSSF_CLI = Path(sys.executable).parent / "model_signing"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


# --- fixtures -------------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mlp = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.mlp(self.embed(x))))
        return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real flowpin checkpoint after 3 AdamW steps of a tiny model (built once, copied per test)."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 64, (4, 8), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1))
        torch.autograd.backward(loss)
        opt.step()
    state = TrainState(
        step=3,
        tokens_seen=96,
        data=DataPosition(dataset_digest="d" * 64, order_seed=7, batch_size=4, next_step=3),
        lr=1e-2,
        config={"seed": 0},
        rng=capture_rng(),
        metrics={"loss": loss.item()},
    )
    path = tmp_path_factory.mktemp("pristine") / "step-000003"
    save_checkpoint(path, state, model=model, optimizer=opt)
    return path


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throw-away project root as the current directory and ``find_root`` answer."""
    for var in ("FLOWPIN_ROOT", "FLOWPIN_SIGNING_KEY", KEY_ENV):
        monkeypatch.delenv(var, raising=False)
    proj = (tmp_path / "proj").resolve()
    (proj / ".dvc").mkdir(parents=True)
    monkeypatch.setenv("FLOWPIN_ROOT", str(proj))
    monkeypatch.chdir(proj)
    return proj


@pytest.fixture
def key(root: Path) -> KeyInfo:
    return init_key(root)


@pytest.fixture
def checkpoint(root: Path, pristine: Path) -> Path:
    """The pristine checkpoint in a run's DVC-tracked ``checkpoints/`` directory."""
    target = root / "runs" / "tiny" / "checkpoints" / pristine.name
    shutil.copytree(pristine, target)
    return target


def openssf_verify(signature: Path, public_key: Path, model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The OpenSSF tool alone: ``model_signing verify key`` in a subprocess."""
    keys = ["--signature", str(signature), "--public_key", str(public_key)]
    return subprocess.run(
        [str(OPENSSF_CLI), "verify", "key", *keys, *extra, str(model)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def other_ec_key(path: Path, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    private = ec.generate_private_key(curve or ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    return private


def bundle_statement(signature: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    bundle = json.loads(signature.read_text())
    return bundle, json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


# --- tamper cases ---------------------------------------------------------------------------------


def flip_model_byte(ck: Path, sig: Path) -> None:
    path = ck / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def change_state_json(ck: Path, sig: Path) -> None:
    path = ck / "state.json"
    document = json.loads(path.read_bytes())
    document["tokens_seen"] += 1  # still a valid checkpoint for flowpin's own digests
    path.write_bytes(json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n")


def add_file(ck: Path, sig: Path) -> None:
    (ck / "notes.txt").write_text("added after signing\n")


def remove_file(ck: Path, sig: Path) -> None:
    (ck / "rng.safetensors").unlink()


def sign_with_other_key(ck: Path, sig: Path) -> None:
    from model_signing import hashing, signing

    other_ec_key(sig.parent / "other.key")
    signing.Config().use_elliptic_key_signer(private_key=sig.parent / "other.key").set_hashing_config(
        hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)
    ).sign(ck, sig)
    (sig.parent / "other.key").unlink()


def other_key_claiming_ours(ck: Path, sig: Path) -> None:
    """Signed by another key, with the bundle's key hint rewritten to name the trusted key."""
    hint = json.loads(sig.read_text())["verificationMaterial"]["publicKey"]["hint"]
    sign_with_other_key(ck, sig)
    bundle = json.loads(sig.read_text())
    bundle["verificationMaterial"]["publicKey"]["hint"] = hint
    sig.write_text(json.dumps(bundle))


TAMPER: dict[str, tuple[Callable[[Path, Path], None], type[Exception], str]] = {
    "flipped byte in model.safetensors": (flip_model_byte, ModelSignatureMismatchError, "model.safetensors"),
    "changed state.json": (change_state_json, ModelSignatureMismatchError, "state.json"),
    "added file": (add_file, ModelSignatureMismatchError, "notes.txt"),
    "removed file": (remove_file, ModelSignatureMismatchError, "rng.safetensors"),
    "signature by another EC key": (sign_with_other_key, UntrustedModelKeyError, "not in keys/model-signing"),
    "another EC key posing as ours": (other_key_claiming_ours, BadModelSignatureError, "does not verify"),
}


# --- sign, then verify with the OpenSSF tool alone ------------------------------------------------


def test_flowpin_signature_verifies_with_the_openssf_cli(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    signed = sign_checkpoint(checkpoint, root=root)
    assert signed.signature == root / "runs" / "tiny" / "model-signatures" / "step-000003.sig"
    assert signed.public_key == key.public_path
    result = openssf_verify(signed.signature, key.public_path, checkpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout
    assert verify_checkpoint(checkpoint, root=root).keyid == key.keyid


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampering_fails_the_openssf_cli_and_flowpin(root: Path, key: KeyInfo, checkpoint: Path, case: str) -> None:
    tamper, error, needle = TAMPER[case]
    signed = sign_checkpoint(checkpoint, root=root)
    assert openssf_verify(signed.signature, key.public_path, checkpoint).returncode == 0
    tamper(checkpoint, signed.signature)
    result = openssf_verify(signed.signature, key.public_path, checkpoint)
    assert result.returncode == 1, f"{case}: the OpenSSF CLI did not refuse it: {result.stdout}{result.stderr}"
    assert "Verification failed with error" in result.stderr
    with pytest.raises(error, match=needle) as info:
        verify_checkpoint(checkpoint, root=root)
    assert isinstance(info.value, ModelSignatureError)


def test_openssf_cli_ignores_git_files_by_default_flowpin_does_not(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    """The OpenSSF CLI skips .git*, .gitignore… unless told --no-ignore-git-paths (documented); flowpin never does."""
    signed = sign_checkpoint(checkpoint, root=root)
    assert openssf_verify(signed.signature, key.public_path, checkpoint, "--no-ignore-git-paths").returncode == 0
    (checkpoint / ".gitignore").write_text("*\n")
    assert openssf_verify(signed.signature, key.public_path, checkpoint).returncode == 0
    strict = openssf_verify(signed.signature, key.public_path, checkpoint, "--no-ignore-git-paths")
    assert strict.returncode == 1
    assert "Extra files found in model 'step-000003': .gitignore" in strict.stderr
    with pytest.raises(ModelSignatureMismatchError, match=r"\.gitignore"):
        verify_checkpoint(checkpoint, root=root)


def test_bundle_without_key_hint_is_tried_against_every_trusted_key(
    root: Path, key: KeyInfo, checkpoint: Path, tmp_path: Path
) -> None:
    """Older model-signing bundles carry no key hint: each trusted key is tried, the failures are named."""
    from flowpin.modelsign import trust_public_key

    second = other_ec_key(tmp_path / "second.key")
    second_id = keyid_of(second.public_key())
    trust_public_key(
        root,
        second.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    signed = sign_checkpoint(checkpoint, root=root)
    bundle = json.loads(signed.signature.read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]
    signed.signature.write_text(json.dumps(bundle))
    assert verify_checkpoint(checkpoint, root=root).keyid == key.keyid
    sign_with_other_key(checkpoint, signed.signature)
    bundle = json.loads(signed.signature.read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]
    signed.signature.write_text(json.dumps(bundle))
    with pytest.raises(UntrustedModelKeyError, match="no trusted key verifies it") as info:
        verify_checkpoint(checkpoint, root=root)
    for keyid in (key.keyid, second_id):
        assert f"{keyid}: the ECDSA signature does not verify" in str(info.value)


def test_signature_made_by_the_openssf_cli_verifies_with_flowpin(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    """The other direction: `model_signing sign key` alone (its defaults), checked by flowpin."""
    signature = root / "external.sig"
    args = ["--private_key", str(key.path), "--signature", str(signature), str(checkpoint)]
    result = subprocess.run(
        [str(OPENSSF_CLI), "sign", "key", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert verify_checkpoint(checkpoint, root=root, signature=signature).keyid == key.keyid
    (checkpoint / ".gitignore").write_text("*\n")  # the tool's signature ignores it; flowpin's check does not
    with pytest.raises(CheckpointError, match=r"\.gitignore"):
        verify_checkpoint(checkpoint, root=root, signature=signature)


# --- the bundle: format facts and digests shared with state.json ----------------------------------


def test_bundle_is_a_dsse_in_toto_statement_whose_digests_equal_state_json(
    root: Path, key: KeyInfo, checkpoint: Path
) -> None:
    signed = sign_checkpoint(checkpoint, root=root)
    bundle, statement = bundle_statement(signed.signature)
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == key.keyid
    envelope = bundle["dsseEnvelope"]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == PREDICATE_TYPE == "https://model_signing/signature/v1.0"
    resources = {r["name"]: r for r in statement["predicate"]["resources"]}
    assert sorted(resources) == sorted(p.name for p in checkpoint.iterdir()) == sorted([*TENSOR_FILES, "state.json"])
    state_raw = (checkpoint / "state.json").read_bytes()
    recorded = json.loads(state_raw)["files"]
    for name in TENSOR_FILES:  # the two systems agree on every digest
        assert resources[name]["algorithm"] == "sha256"
        assert resources[name]["digest"] == recorded[name]["sha256"]
        assert resources[name]["digest"] == hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    assert resources["state.json"]["digest"] == hashlib.sha256(state_raw).hexdigest()
    assert dict(signed.files) == {name: r["digest"] for name, r in resources.items()}
    # the DSSE signature checked independently: ECDSA P-256/SHA-256 over PAE(type, payload)
    payload = base64.b64decode(envelope["payload"])
    pae = b"DSSEv1 %d %s %d %s" % (28, b"application/vnd.in-toto+json", len(payload), payload)
    public = serialization.load_pem_public_key(key.public_path.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(base64.b64decode(envelope["signatures"][0]["sig"]), pae, ec.ECDSA(hashes.SHA256()))


def test_keyid_is_the_bundle_hint_sha256_of_the_public_pem(root: Path, key: KeyInfo) -> None:
    pem = key.public_path.read_bytes()
    assert key.public_path.parent == root / TRUST_DIR
    assert key.keyid == hashlib.sha256(pem).hexdigest() == key.public_path.stem
    assert load_trusted_keys(root) == {key.keyid: key.public_path}
    info, private = load_private_key(root)
    assert keyid_of(private.public_key()) == info.keyid == key.keyid


# --- integrity before signing; where the signature goes; atomic replacement -------------------------


def test_a_corrupt_checkpoint_is_never_signed(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    sig = default_signature_path(checkpoint)
    flip_model_byte(checkpoint, sig)
    with pytest.raises(CheckpointCorruptError, match=r"model\.safetensors"):
        sign_checkpoint(checkpoint, root=root)
    assert not sig.exists()


def test_a_checkpoint_with_a_foreign_file_is_not_signed(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    add_file(checkpoint, checkpoint)
    with pytest.raises(CheckpointError, match=r"notes\.txt"):
        sign_checkpoint(checkpoint, root=root)
    assert not default_signature_path(checkpoint).exists()


def test_signature_stays_outside_the_dvc_tracked_checkpoints(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    before = sorted(p.relative_to(checkpoint.parent) for p in checkpoint.parent.rglob("*"))
    sign_checkpoint(checkpoint, root=root)
    assert sorted(p.relative_to(checkpoint.parent) for p in checkpoint.parent.rglob("*")) == before
    assert default_signature_path(Path("elsewhere/ck")) == Path("elsewhere/ck.sig")
    assert default_signature_path(Path("runs/a/checkpoints/step-000001")) == Path(
        "runs/a/model-signatures/step-000001.sig"
    )
    with pytest.raises(ModelSigningInputError, match="inside the checkpoint"):
        sign_checkpoint(checkpoint, root=root, signature=checkpoint / "model.sig")


def test_failed_resign_leaves_the_previous_signature(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    signed = sign_checkpoint(checkpoint, root=root)
    before = signed.signature.read_bytes()
    remove_file(checkpoint, signed.signature)
    with pytest.raises(CheckpointError):
        sign_checkpoint(checkpoint, root=root)
    assert signed.signature.read_bytes() == before
    assert [p.name for p in signed.signature.parent.iterdir()] == [signed.signature.name]  # no temporaries


def test_verify_input_errors(root: Path, key: KeyInfo, checkpoint: Path) -> None:
    with pytest.raises(ModelSigningInputError, match="no signature at"):
        verify_checkpoint(checkpoint, root=root)
    with pytest.raises(ModelSigningInputError, match="no checkpoint directory"):
        verify_checkpoint(root / "nope", root=root)
    garbage = root / "garbage.sig"
    garbage.write_text('{"mediaType": "something/else"}')
    with pytest.raises(ModelSignatureFormatError, match=r"garbage\.sig"):
        verify_checkpoint(checkpoint, root=root, signature=garbage)


# --- keys: permissions, algorithms, two separate trust stores ---------------------------------------


def test_key_init_creates_a_0600_p256_key_and_refuses_to_overwrite(root: Path, key: KeyInfo) -> None:
    assert key.path == root / ".flowpin" / "keys" / "model-signing.key"
    assert key.path.stat().st_mode & 0o777 == 0o600
    assert key.path.parent.stat().st_mode & 0o777 == 0o700
    assert load_private_key(root)[1].curve.name == "secp256r1"
    with pytest.raises(ModelSigningKeyError, match="already exists"):
        init_key(root)
    assert init_key(root, force=True).keyid != key.keyid


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_refused_when_group_or_world_accessible(root: Path, key: KeyInfo, checkpoint: Path, mode: int) -> None:
    key.path.chmod(mode)
    with pytest.raises(ModelSigningKeyError, match="chmod 600"):
        sign_checkpoint(checkpoint, root=root)


def test_ed25519_key_is_refused_for_model_signing(
    root: Path, tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ed25519.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    monkeypatch.setenv(KEY_ENV, str(path))
    with pytest.raises(ModelSigningKeyError, match=r"Ed25519PrivateKey.*EC P-256"):
        sign_checkpoint(checkpoint, root=root)
    other_ec_key(path, ec.SECP384R1())  # model-signing would take P-384; flowpin pins P-256
    with pytest.raises(ModelSigningKeyError, match="secp384r1"):
        load_private_key(root)


def test_the_two_trust_stores_never_mix(root: Path, key: KeyInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    # an EC public key where manifest keys live is refused for manifests
    shutil.copy(key.public_path, root / "keys" / "ec.pub")
    with pytest.raises(KeyFileError, match=r"ec\.pub.*Ed25519"):
        load_trust_store(root)
    (root / "keys" / "ec.pub").unlink()
    # the EC private key is refused as a manifest signing key
    monkeypatch.setenv("FLOWPIN_SIGNING_KEY", str(key.path))
    with pytest.raises(KeyFileError, match="Ed25519"):
        load_signer(root)
    # an Ed25519 public key among the model-signing keys is refused for model signing
    ed_pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (root / TRUST_DIR / "ed.pem").write_bytes(ed_pem)
    with pytest.raises(ModelSigningKeyError, match=r"ed\.pem.*EC P-256"):
        load_trusted_keys(root)


def test_trusted_key_file_must_be_named_by_its_keyid(root: Path, key: KeyInfo) -> None:
    key.public_path.rename(key.public_path.with_name("renamed.pem"))
    with pytest.raises(ModelSigningKeyError, match=f"rename it to {key.keyid}.pem"):
        load_trusted_keys(root)


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_key_init_if_missing_repairs_an_untrusted_key(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A key init killed between the private and the public key leaves an untrusted key: --if-missing trusts it."""
    assert main(["model-sign", "key", "init"]) == 0
    public = next((root / TRUST_DIR).glob("*.pem"))
    pem = public.read_bytes()
    public.unlink()
    capsys.readouterr()
    assert main(["model-sign", "key", "init", "--if-missing"]) == 0
    assert "was missing from the trust store: added" in capsys.readouterr().out
    assert public.read_bytes() == pem
    assert main(["model-sign", "key", "init", "--if-missing"]) == 0
    assert "added" not in capsys.readouterr().out


def test_cli_sign_prints_an_openssf_command_that_works_and_verify_exit_codes(
    root: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model-sign", "key", "init"]) == 0
    assert main(["model-sign", "key", "init", "--if-missing"]) == 0
    assert main(["model-sign", "key", "init"]) == 2
    capsys.readouterr()
    assert main(["model-sign", "sign", str(checkpoint.relative_to(root))]) == 0
    out = capsys.readouterr().out
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:3] == ["model_signing", "verify", "key"]
    result = subprocess.run(
        [str(OPENSSF_CLI), *command[1:]], capture_output=True, text=True, timeout=120, check=False, cwd=root
    )
    assert result.returncode == 0, result.stderr
    assert main(["model-sign", "verify", str(checkpoint)]) == 0
    assert "OK" in capsys.readouterr().out
    flip_model_byte(checkpoint, checkpoint)
    assert main(["model-sign", "verify", str(checkpoint)]) == 1
    assert "ModelSignatureMismatchError" in capsys.readouterr().out
    assert main(["model-sign", "verify", str(checkpoint), "--signature", "missing.sig"]) == 2
    assert "ModelSigningInputError" in capsys.readouterr().err
    os.chmod(root / ".flowpin" / "keys" / "model-signing.key", 0o644)
    assert main(["model-sign", "sign", str(checkpoint)]) == 2
    assert "ModelSigningKeyError" in capsys.readouterr().err
