"""A catalogue of hostile and malformed inputs, one named case each, through flowpin's public entry points.

Every case builds its bad input for real under ``tmp_path`` (the real writers -- ``record``,
``write_dataset``, ``run_tokenize``, ``save_checkpoint``, ``init_key``, the repository's recipes -- then a
corruption) and runs a public entry point: ``verify_manifest``, ``load_signer``/``load_trust_store``,
``stage_run`` on a Hydra-composed recipe, ``read_shard_bytes``/``read_dataset``/``TokenizedDataset``,
``load_checkpoint``, or the ``flowpin`` command line in a subprocess. Each asserts:

* the exact :class:`~flowpin.errors.FlowpinError` subclass;
* the message names *where* (the file or the recipe key) and says *how to fix* it (a phrase per case);
* nothing on disk changed: every file's bytes and mode and every directory under ``tmp_path`` are the
  same after the failed call as before it;
* for command-line cases: exit status 2, ``flowpin: <ErrorClass>:`` on stderr and no Python traceback.

List the cases: ``pytest tests/test_hostile_input.py --collect-only -q``. (Fuzzing lives elsewhere;
unit tests of the safetensors rules are in test_tensorfile.py, of the no-pickle rule in test_no_pickle.py.)
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
import zstandard
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from torch import nn

from flowpin.canonical import canonical_json
from flowpin.constants import INDEX_NAME
from flowpin.data.dedup import DedupConfig
from flowpin.data.shards import read_dataset, read_shard_bytes, write_dataset
from flowpin.data.tokenize import TokenizeConfig, run_tokenize
from flowpin.data.tokenized import TokenizedDataset
from flowpin.errors import (
    ArtifactMissingError,
    ArtifactUnreadableError,
    BadSignatureError,
    CheckpointCorruptError,
    CheckpointMissingError,
    DataOrderError,
    DigestMismatchError,
    DuplicateSubjectError,
    FlowpinError,
    KeyFileError,
    ManifestParseError,
    MissingSignatureError,
    RecipeError,
    SchemaError,
    ShardError,
    TensorFileError,
    UnsupportedVersionError,
    UntrustedKeyError,
)
from flowpin.hashing import Hasher
from flowpin.manifest.record import record
from flowpin.manifest.statement import MAX_MANIFEST_BYTES
from flowpin.manifest.verify import Finding, verify_manifest
from flowpin.recipe import to_config
from flowpin.signing import PAYLOAD_TYPE, init_key, keyid_of, load_signer, load_trust_store, pae
from flowpin.stage import stage_run
from flowpin.train.checkpoint import load_checkpoint, save_checkpoint
from helpers import Project, one_step_state

REPO = Path(__file__).resolve().parents[1]
FLOWPIN = str(Path(sys.executable).parent / "flowpin")
RESTORE = "restore it from git or re-run its stage"
CKPT_FIX = "restore it or resume from an earlier checkpoint"
SHARD_FIX = "restore it (dvc checkout) or re-run the stage that wrote it"
RECIPE_FIX = "fix it in the recipe (params/*.yaml) or in the override"


@dataclasses.dataclass(frozen=True)
class Bad:
    """What a case built: the call that must fail (or the command line) and where the message must point."""

    where: str
    """A path or recipe key the message must contain."""
    call: Callable[[], object] | None = None
    """Raises the error, or returns the :class:`Finding` holding it (``verify_manifest`` does not raise)."""
    argv: tuple[str, ...] = ()
    """Instead of ``call``: ``flowpin <argv>`` run in ``cwd`` with ``FLOWPIN_ROOT=cwd``."""
    cwd: Path | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Bad]
    error: type[FlowpinError]
    fix: str
    """A how-to-fix phrase the message must contain."""


# --- builders shared by the cases ---------------------------------------------------------------------


def new_project(tmp: Path) -> Project:
    root = tmp / "proj"
    (root / ".dvc").mkdir(parents=True)
    return Project(root=root, signer=init_key(root, key_path=root / ".flowpin" / "keys" / "signing.key"))


def recorded(tmp: Path) -> tuple[Project, Path]:
    p = new_project(tmp)
    return p, p.record_stage("train")


def verify(p: Project, path: Path) -> Callable[[], object]:
    def run() -> object:
        report = verify_manifest(path, root=p.root, trusted=load_trust_store(p.root), hasher=Hasher(p.root, workers=1))
        assert len(report.findings) == 1, report.findings
        return report.findings[0]

    return run


def envelope(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_bytes())
    return doc


def statement(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(base64.b64decode(envelope(path)["payload"]))
    return doc


def write_envelope(path: Path, env: dict[str, Any]) -> None:
    path.write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")


def resign(p: Project, path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Re-sign a changed statement with the project's trusted key (bypassing the writer's validation)."""
    st = statement(path)
    mutate(st)
    write_envelope(path, p.signer.sign(PAYLOAD_TYPE, canonical_json(st)))


def with_foreign_signature(p: Project, path: Path, sign: Callable[[bytes], bytes], keyid: str) -> None:
    env = envelope(path)
    message = pae(env["payloadType"], base64.b64decode(env["payload"]))
    env["signatures"] = [{"keyid": keyid, "sig": base64.b64encode(sign(message)).decode()}]
    write_envelope(path, env)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def cli(root: Path, where: str, *argv: str) -> Bad:
    return Bad(where=where, argv=argv, cwd=root)


# --- manifests ------------------------------------------------------------------------------------


def manifest_truncated(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    return Bad(str(m), verify(p, m))


def manifest_not_utf8(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    m.write_bytes(b"\xff\xfe" + m.read_bytes())
    return Bad(str(m), verify(p, m))


def manifest_oversized(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    with m.open("r+b") as fh:  # sparse: no disk used, and the size alone must make it refused unread
        fh.truncate(MAX_MANIFEST_BYTES + 1)
    return Bad(str(m), verify(p, m))


def manifest_duplicate_envelope_key(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    # two "payload" keys: Python's json keeps the last, Go's and others the first -- a parser differential
    text = m.read_text()
    m.write_text(text.replace('"payload": ', '"payload": "e30=",\n  "payload": ', 1))
    return Bad(str(m), verify(p, m))


def manifest_duplicate_statement_key(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    body = canonical_json(statement(m))
    crafted = body.replace(b'{"_type":', b'{"_type":"https://example.invalid/other","_type":', 1)
    assert crafted != body
    write_envelope(m, p.signer.sign(PAYLOAD_TYPE, crafted))
    return Bad(str(m), verify(p, m))


def manifest_unknown_version(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    resign(p, m, lambda s: s["predicate"]["buildDefinition"]["internalParameters"].update(manifestVersion=2))
    return Bad(str(m), verify(p, m))


def manifest_subject_escapes_repository(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    resign(p, m, lambda s: s["subject"][0].update(name="../../etc/passwd"))
    return Bad(str(m), verify(p, m))


def manifest_duplicate_subject(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    resign(p, m, lambda s: s["subject"].append(copy.deepcopy(s["subject"][0])))
    return Bad("artifacts/train/model.bin", verify(p, m))


def manifest_subject_changed(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    (p.root / "artifacts" / "train" / "model.bin").write_bytes(b"other weights\n")
    return Bad("artifacts/train/model.bin", verify(p, m))


def manifest_parent_missing(tmp: Path) -> Bad:
    p = new_project(tmp)
    p.record_stage("prep")
    m = p.record_stage("train", parents=["manifests/prep.json"])
    p.manifest_path("prep").unlink()
    return Bad("manifests/prep.json", verify(p, m))


def manifest_cli_show_truncated(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    m.write_bytes(m.read_bytes()[:100])
    return cli(p.root, str(m), "show", str(m))


# --- envelopes ------------------------------------------------------------------------------------


def envelope_payload_not_base64(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    env = envelope(m)
    env["payload"] = env["payload"][:-3] + "!*!"
    write_envelope(m, env)
    return Bad(str(m), verify(p, m))


def envelope_payload_not_json(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    write_envelope(m, p.signer.sign(PAYLOAD_TYPE, b"not json at all"))
    return Bad(str(m), verify(p, m))


def envelope_no_signatures(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    env = envelope(m)
    env["signatures"] = []
    write_envelope(m, env)
    return Bad(str(m), verify(p, m))


def envelope_alg_field_injected(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    env = envelope(m)
    env["signatures"][0]["alg"] = "ES256"  # no algorithm is ever read from an envelope
    write_envelope(m, env)
    return Bad(str(m), verify(p, m))


def envelope_untrusted_signer(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    stranger = init_key(tmp / "elsewhere", key_path=tmp / "elsewhere" / "k.key")
    write_envelope(m, stranger.sign(PAYLOAD_TYPE, base64.b64decode(envelope(m)["payload"])))
    return Bad(str(m), verify(p, m))


def envelope_payload_edited_after_signing(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    env = envelope(m)
    st = statement(m)
    st["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["lr"] = 0.2
    env["payload"] = base64.b64encode(canonical_json(st)).decode()
    write_envelope(m, env)
    return Bad(str(m), verify(p, m))


def envelope_ecdsa_signature_under_trusted_keyid(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    key = ec_key()
    with_foreign_signature(p, m, lambda msg: key.sign(msg, ec.ECDSA(hashes.SHA256())), p.signer.keyid)
    return Bad(str(m), verify(p, m))


def envelope_rsa_signature_under_trusted_keyid(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with_foreign_signature(p, m, lambda msg: key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), p.signer.keyid)
    return Bad(str(m), verify(p, m))


def envelope_signed_by_model_signing_key(tmp: Path) -> Bad:
    """An EC P-256 key kept for OpenSSF model signing (keys/model-signing/) never vouches for a manifest."""
    p, m = recorded(tmp)
    key = ec_key()
    (p.root / "keys" / "model-signing").mkdir()
    (p.root / "keys" / "model-signing" / "checkpoints.pub").write_bytes(public_pem(key))
    keyid = hashlib.sha256(public_pem(key)).hexdigest()
    with_foreign_signature(p, m, lambda msg: key.sign(msg, ec.ECDSA(hashes.SHA256())), keyid)
    return Bad(str(m), verify(p, m))


def envelope_cli_show_not_base64(tmp: Path) -> Bad:
    p, m = recorded(tmp)
    env = envelope(m)
    env["payload"] = "%%%" + env["payload"]
    write_envelope(m, env)
    return cli(p.root, str(m), "show", str(m))


# --- keys -----------------------------------------------------------------------------------------


def key_world_readable_private(tmp: Path) -> Bad:
    p = new_project(tmp)
    path = p.root / ".flowpin" / "keys" / "signing.key"
    path.chmod(0o644)
    return Bad(str(path), lambda: load_signer(p.root, path))


def key_rsa_private(tmp: Path) -> Bad:
    p = new_project(tmp)
    path = p.root / ".flowpin" / "keys" / "rsa.key"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    return Bad(str(path), lambda: load_signer(p.root, path))


def key_ec_public_in_trust_store(tmp: Path) -> Bad:
    p = new_project(tmp)
    path = p.root / "keys" / "model-signing.pub"
    path.write_bytes(public_pem(ec_key()))
    return Bad(str(path), lambda: load_trust_store(p.root))


def key_garbage_public(tmp: Path) -> Bad:
    p = new_project(tmp)
    path = p.root / "keys" / "colleague.pub"
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n")
    return Bad(str(path), lambda: load_trust_store(p.root))


def key_cli_verify_with_ec_key_in_keys(tmp: Path) -> Bad:
    p, _ = recorded(tmp)
    path = p.root / "keys" / "ec.pub"
    path.write_bytes(public_pem(ec_key()))
    return cli(p.root, str(path), "verify", "--all", "--no-cache")


def key_cli_pub_is_a_directory(tmp: Path) -> Bad:
    p = new_project(tmp)
    path = p.root / "keys" / "dir.pub"
    path.mkdir()
    return cli(p.root, str(path), "key", "list")


# --- recipes (the repository's params/, composed by Hydra, through stage_run) ----------------------


def recipe_project(tmp: Path, mutate: Callable[[dict[str, Any]], None], name: str = "dedup") -> Path:
    root = tmp / "proj"
    (root / ".dvc").mkdir(parents=True)
    shutil.copytree(REPO / "params", root / "params")
    path = root / "params" / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    # stage_run's own checks (to_config), the second line: the recipe schema would refuse most of these cases at
    # composition already (tests/test_recipe_schema.py), so it is left out of the composed defaults here
    doc["defaults"] = [d for d in doc["defaults"] if not str(d).startswith("schema/")]
    mutate(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


def dedup_stage(root: Path) -> Callable[[], object]:
    def run() -> object:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(root / "params"), version_base="1.3"):
            cfg = compose("dedup")
        with stage_run("dedup", cfg, DedupConfig, root=root, inputs=("corpus",)):
            raise AssertionError("the stage body must not run")

    return run


def recipe_case(key: str, mutate: Callable[[dict[str, Any]], None]) -> Callable[[Path], Bad]:
    return lambda tmp: Bad(key, dedup_stage(recipe_project(tmp, mutate)))


def recipe_cli_batch_interpolated_out(tmp: Path) -> Bad:
    root = recipe_project(tmp, lambda d: d["paths"].update(out="${hydra:runtime.cwd}/data/tokenize"), "tokenize")
    recipe = str(root / "params" / "tokenize.yaml")
    return cli(root, "paths.out", "batch", recipe, "--step", "0", "--order-seed", "1", "--batch-size", "2")


# --- corpora (zstd JSONL datasets, tokenized shards) ----------------------------------------------

RECORDS = [{"id": f"doc-{i}", "text": f"document {i} " * 20} for i in range(6)]


def dataset(tmp: Path) -> Path:
    out = tmp / "data" / "dedup"
    write_dataset(RECORDS, out, docs_per_shard=3, level=3)
    return out


def repin(data_dir: Path, number: int, content: bytes) -> None:
    """A consistent forgery: shard ``number`` replaced by a frame of ``content``, re-pinned in index.json."""
    name = f"shard-{number:05d}.jsonl.zst"
    (data_dir / name).write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(content))
    index = json.loads((data_dir / INDEX_NAME).read_bytes())
    index["shards"][number].update(sha256=hashlib.sha256(content).hexdigest(), uncompressed_bytes=len(content))
    (data_dir / INDEX_NAME).write_bytes(canonical_json(index) + b"\n")


def read_all(data_dir: Path) -> Callable[[], object]:
    return lambda: list(read_dataset(data_dir))


def rle_frame(declared: int, blocks: int) -> bytes:
    """A hand-made zstd frame of ``blocks`` RLE blocks of 128 KiB zeros (4 bytes each) declaring ``declared``."""
    out = bytearray(struct.pack("<IB", 0xFD2FB528, 0b1110_0000)) + struct.pack("<Q", declared)  # 8-byte FCS
    for i in range(blocks):
        header = (i == blocks - 1) | (1 << 1) | ((128 << 10) << 3)  # last?, RLE, block size
        out += header.to_bytes(3, "little") + b"\x00"
    return bytes(out)


def corpus_shard_declares_more_than_index(tmp: Path) -> Bad:
    data = dataset(tmp)
    shard = data / "shard-00000.jsonl.zst"
    big = b"".join(canonical_json({"id": f"x{i}", "text": "y" * 100}) + b"\n" for i in range(200))
    shard.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(big))
    return Bad(str(shard), read_all(data))


def corpus_frame_without_declared_size(tmp: Path) -> Bad:
    data = dataset(tmp)
    shard = data / "shard-00000.jsonl.zst"
    content = read_shard_bytes(shard)
    shard.write_bytes(zstandard.ZstdCompressor(write_content_size=False).compress(content))
    return Bad(str(shard), read_all(data))


def corpus_zstd_bomb_declared(tmp: Path) -> Bad:
    """64 KiB on disk declaring 2 GiB: refused from the header, nothing is decompressed."""
    path = tmp / "bomb.jsonl.zst"
    path.write_bytes(rle_frame(2 << 30, 16384))
    return Bad(str(path), lambda: read_shard_bytes(path))


def corpus_zstd_bomb_lying_header(tmp: Path) -> Bad:
    """Declares 4 KiB, expands to 2 GiB: decompression stops at the declared size."""
    path = tmp / "bomb.jsonl.zst"
    path.write_bytes(rle_frame(4096, 16384))
    return Bad(str(path), lambda: read_shard_bytes(path, max_content_size=1 << 20))


def corpus_zstd_bomb_in_verify(tmp: Path) -> Bad:
    """A recorded dataset whose shard is swapped for a lying bomb: hashing stops at what the frame declares."""
    p = new_project(tmp)
    write_dataset(RECORDS, p.root / "data", docs_per_shard=3, level=3)
    with record("data", recipe={}, code=[], root=p.root, signer=p.signer) as rec:
        rec.output("data")
    (p.root / "data" / "shard-00000.jsonl.zst").write_bytes(rle_frame(4096, 16384))
    return Bad("shard-00000.jsonl.zst", verify(p, p.manifest_path("data")))


def corpus_shard_trailing_data(tmp: Path) -> Bad:
    data = dataset(tmp)
    shard = data / "shard-00001.jsonl.zst"
    shard.write_bytes(shard.read_bytes() + b"\x00garbage")
    return Bad(str(shard), read_all(data))


def corpus_shard_truncated(tmp: Path) -> Bad:
    data = dataset(tmp)
    shard = data / "shard-00001.jsonl.zst"
    shard.write_bytes(shard.read_bytes()[:-9])
    return Bad(str(shard), read_all(data))


def corpus_shard_swapped(tmp: Path) -> Bad:
    data = dataset(tmp)
    shard = data / "shard-00000.jsonl.zst"
    shard.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(b'{"id":"evil","text":"x"}\n'))
    return Bad(str(shard), read_all(data))


def corpus_line_not_json(tmp: Path) -> Bad:
    data = dataset(tmp)
    repin(data, 0, b'{"id":"a","text":"x"}\nnot json\n')
    return Bad(str(data / "shard-00000.jsonl.zst"), read_all(data))


def corpus_index_truncated(tmp: Path) -> Bad:
    data = dataset(tmp)
    index = data / INDEX_NAME
    index.write_bytes(index.read_bytes()[:20])
    return Bad(str(index), read_all(data))


def corpus_index_names_a_path_outside(tmp: Path) -> Bad:
    data = dataset(tmp)
    index = data / INDEX_NAME
    doc = json.loads(index.read_bytes())
    doc["shards"][0]["name"] = "../../etc/shard-00000.jsonl.zst"
    index.write_bytes(canonical_json(doc) + b"\n")
    return Bad(str(index), read_all(data))


def tokenized_copy(tmp: Path, forge: Callable[[bytes], bytes]) -> Bad:
    """A copy of the module's tokenized dataset whose shard 0 is forged and re-pinned in index.json."""
    dest = tmp / "tok"
    shutil.copytree(_TOKENIZED[0], dest)
    shard = dest / "seq-00000.safetensors.zst"
    raw = forge(read_shard_bytes(shard))
    shard.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(raw))
    index = json.loads((dest / INDEX_NAME).read_bytes())
    index["shards"][0].update(sha256=hashlib.sha256(raw).hexdigest(), uncompressed_bytes=len(raw))
    (dest / INDEX_NAME).write_bytes(canonical_json(index))
    return Bad(str(shard), lambda: TokenizedDataset.open(dest).sequences([0]))


_TOKENIZED: list[Path] = []


# --- safetensors forgeries (shared by tokenized shards and checkpoints) ---------------------------


def st_split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    header: dict[str, Any] = json.loads(data[8 : 8 + n])
    return header, data[8 + n :]


def st_join(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def st_overlap(data: bytes) -> bytes:
    header, body = st_split(data)
    first = next(k for k in header if k != "__metadata__")
    header["zz_alias"] = dict(header[first])  # a second tensor over the same bytes
    return st_join(header, body)


def st_duplicate_key(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    raw = data[8 : 8 + n].rstrip()
    header, body = st_split(data)
    first = next(k for k in header if k != "__metadata__")
    dup = json.dumps({first: header[first]})[1:-1].encode()
    return st_join(raw[:1] + dup + b"," + raw[1:], body)


def st_header_length_huge(data: bytes) -> bytes:
    return struct.pack("<Q", 1 << 62) + data[8:]


def st_trailing_bytes(data: bytes) -> bytes:
    return data + b"\x00" * 8


def st_unknown_dtype(data: bytes) -> bytes:
    header, body = st_split(data)
    first = next(k for k in header if k != "__metadata__")
    header[first]["dtype"] = "PYOBJECT"
    return st_join(header, body)


def st_gap(data: bytes) -> bytes:
    header, body = st_split(data)
    for k, v in header.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]
    return st_join(header, b"\x00" * 4 + body)


# --- checkpoints ----------------------------------------------------------------------------------


def checkpoint(tmp: Path) -> tuple[Path, Callable[[], object]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = one_step_state(model, opt, torch.ones(2, 4))
    path = tmp / "runs" / "step-000001"
    save_checkpoint(path, state, model=model, optimizer=opt)

    def load() -> object:
        fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        return load_checkpoint(
            path, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=1e-3), restore_rng_state=False
        )

    return path, load


def checkpoint_forged(name: str, forge: Callable[[bytes], bytes]) -> Callable[[Path], Bad]:
    """``name`` rewritten by ``forge`` and re-pinned in state.json (which is not signed), then loaded."""

    def build(tmp: Path) -> Bad:
        path, load = checkpoint(tmp)
        data = forge((path / name).read_bytes())
        (path / name).write_bytes(data)
        state = json.loads((path / "state.json").read_bytes())
        state["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        (path / "state.json").write_bytes(canonical_json(state) + b"\n")
        return Bad(str(path / name), load)

    return build


def checkpoint_file_replaced(tmp: Path) -> Bad:
    path, load = checkpoint(tmp)
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    return Bad(str(target), load)


def checkpoint_state_truncated(tmp: Path) -> Bad:
    path, load = checkpoint(tmp)
    state = path / "state.json"
    state.write_bytes(state.read_bytes()[:-30])
    return Bad(str(state), load)


def checkpoint_optimizer_missing(tmp: Path) -> Bad:
    path, load = checkpoint(tmp)
    (path / "optimizer.safetensors").unlink()
    return Bad(str(path / "optimizer.safetensors"), load)


# --- the catalogue --------------------------------------------------------------------------------

CASES = [
    # manifests
    Case(
        "manifest/truncated-json",
        manifest_truncated,
        ManifestParseError,
        "restore the manifest from git or re-run its stage",
    ),
    Case("manifest/not-utf8", manifest_not_utf8, ManifestParseError, RESTORE),
    Case("manifest/larger-than-any-manifest", manifest_oversized, ManifestParseError, "restore the manifest from git"),
    Case(
        "manifest/duplicate-envelope-key", manifest_duplicate_envelope_key, ManifestParseError, "restore the manifest"
    ),
    Case("manifest/duplicate-statement-key", manifest_duplicate_statement_key, ManifestParseError, "re-run its stage"),
    Case("manifest/unknown-version", manifest_unknown_version, UnsupportedVersionError, "upgrade flowpin"),
    Case("manifest/subject-escapes-repository", manifest_subject_escapes_repository, SchemaError, RESTORE),
    Case("manifest/duplicate-subject", manifest_duplicate_subject, DuplicateSubjectError, "re-run the stage"),
    Case("manifest/subject-changed", manifest_subject_changed, DigestMismatchError, "restore it (dvc checkout)"),
    Case("manifest/parent-manifest-missing", manifest_parent_missing, ArtifactMissingError, "restore it or re-run"),
    Case("manifest/cli-show-truncated", manifest_cli_show_truncated, ManifestParseError, "restore the manifest"),
    # envelopes
    Case("envelope/payload-not-base64", envelope_payload_not_base64, ManifestParseError, RESTORE),
    Case("envelope/payload-not-json", envelope_payload_not_json, ManifestParseError, RESTORE),
    Case("envelope/no-signatures", envelope_no_signatures, MissingSignatureError, "sign it with `flowpin`"),
    Case("envelope/alg-field-injected", envelope_alg_field_injected, SchemaError, RESTORE),
    Case("envelope/untrusted-signer", envelope_untrusted_signer, UntrustedKeyError, "add the signer's public key"),
    Case("envelope/payload-edited-after-signing", envelope_payload_edited_after_signing, BadSignatureError, "re-run"),
    Case(
        "envelope/ecdsa-p256-sig-under-trusted-ed25519-keyid",
        envelope_ecdsa_signature_under_trusted_keyid,
        BadSignatureError,
        "restore the original",
    ),
    Case(
        "envelope/rsa-sig-under-trusted-ed25519-keyid",
        envelope_rsa_signature_under_trusted_keyid,
        BadSignatureError,
        "restore the original",
    ),
    Case(
        "envelope/signed-by-model-signing-ec-key",
        envelope_signed_by_model_signing_key,
        UntrustedKeyError,
        "add the signer's public key",
    ),
    Case("envelope/cli-show-payload-not-base64", envelope_cli_show_not_base64, ManifestParseError, RESTORE),
    # keys
    Case("key/world-readable-private-key", key_world_readable_private, KeyFileError, "chmod 600"),
    Case("key/rsa-private-key", key_rsa_private, KeyFileError, "flowpin key init --force"),
    Case("key/ec-public-key-in-trust-store", key_ec_public_in_trust_store, KeyFileError, "remove it from keys/"),
    Case("key/garbage-public-key", key_garbage_public, KeyFileError, "replace it with the signer's Ed25519"),
    Case("key/cli-verify-with-ec-key-in-keys", key_cli_verify_with_ec_key_in_keys, KeyFileError, "remove it from"),
    Case("key/cli-pub-is-a-directory", key_cli_pub_is_a_directory, KeyFileError, "or remove it"),
    # recipes
    Case(
        "recipe/unknown-key",
        recipe_case("dedup.fuzzy.thresold", lambda d: d["dedup"]["fuzzy"].update(thresold=0.5)),
        RecipeError,
        "fix the spelling or remove it",
    ),
    Case(
        "recipe/wrong-type",
        recipe_case("dedup.fuzzy.num_perm", lambda d: d["dedup"]["fuzzy"].update(num_perm="many")),
        RecipeError,
        RECIPE_FIX,
    ),
    Case(
        "recipe/bool-for-int",
        recipe_case("dedup.shards.docs_per_shard", lambda d: d["dedup"]["shards"].update(docs_per_shard=True)),
        RecipeError,
        RECIPE_FIX,
    ),
    Case(
        "recipe/out-of-range",
        recipe_case("dedup.shards.zstd_level", lambda d: d["dedup"]["shards"].update(zstd_level=99)),
        RecipeError,
        RECIPE_FIX,
    ),
    Case(
        "recipe/nan-threshold",
        recipe_case("dedup.fuzzy.threshold", lambda d: d["dedup"]["fuzzy"].update(threshold=float("nan"))),
        RecipeError,
        "e.g. 0.8",
    ),
    Case(
        "recipe/missing-required-key",
        recipe_case("dedup.shards.zstd_level", lambda d: d["dedup"]["shards"].pop("zstd_level")),
        RecipeError,
        "add it to the recipe",
    ),
    Case(
        "recipe/block-is-a-list",
        recipe_case("dedup.fuzzy", lambda d: d["dedup"].update(fuzzy=[1, 2])),
        RecipeError,
        RECIPE_FIX,
    ),
    Case(
        "recipe/missing-input-role",
        recipe_case("paths.inputs.corpus", lambda d: d["paths"].update(inputs={})),
        RecipeError,
        "name the upstream dataset",
    ),
    Case(
        "recipe/cli-batch-interpolated-out",
        recipe_cli_batch_interpolated_out,
        DataOrderError,
        "name the tokenized directory itself",
    ),
    # corpora
    Case("corpus/shard-declares-more-than-index", corpus_shard_declares_more_than_index, ShardError, SHARD_FIX),
    Case("corpus/frame-without-declared-size", corpus_frame_without_declared_size, ShardError, "rewrite it with"),
    Case("corpus/zstd-bomb-declared-2gib", corpus_zstd_bomb_declared, ShardError, SHARD_FIX),
    Case("corpus/zstd-bomb-lying-header", corpus_zstd_bomb_lying_header, ShardError, SHARD_FIX),
    Case("corpus/zstd-bomb-in-verify", corpus_zstd_bomb_in_verify, ArtifactUnreadableError, "regenerate the file"),
    Case("corpus/shard-trailing-data", corpus_shard_trailing_data, ShardError, SHARD_FIX),
    Case("corpus/shard-truncated", corpus_shard_truncated, ShardError, SHARD_FIX),
    Case("corpus/shard-swapped", corpus_shard_swapped, ShardError, SHARD_FIX),
    Case("corpus/line-not-json", corpus_line_not_json, ShardError, SHARD_FIX),
    Case("corpus/index-truncated", corpus_index_truncated, ShardError, "rerun the stage that writes it"),
    Case("corpus/index-names-path-outside", corpus_index_names_a_path_outside, ShardError, "rerun the stage"),
    Case(
        "corpus/tokenized-safetensors-offsets-overlap",
        lambda tmp: tokenized_copy(tmp, st_overlap),
        ShardError,
        "rerun the tokenize stage",
    ),
    Case(
        "corpus/tokenized-safetensors-gap",
        lambda tmp: tokenized_copy(tmp, st_gap),
        ShardError,
        "rerun the tokenize stage",
    ),
    # checkpoints
    Case(
        "checkpoint/safetensors-offsets-overlap",
        checkpoint_forged("model.safetensors", st_overlap),
        TensorFileError,
        CKPT_FIX,
    ),
    Case(
        "checkpoint/safetensors-duplicate-tensor-name",
        checkpoint_forged("model.safetensors", st_duplicate_key),
        TensorFileError,
        CKPT_FIX,
    ),
    Case(
        "checkpoint/safetensors-header-length-huge",
        checkpoint_forged("optimizer.safetensors", st_header_length_huge),
        TensorFileError,
        CKPT_FIX,
    ),
    Case(
        "checkpoint/safetensors-trailing-bytes",
        checkpoint_forged("rng.safetensors", st_trailing_bytes),
        TensorFileError,
        CKPT_FIX,
    ),
    Case(
        "checkpoint/safetensors-unknown-dtype",
        checkpoint_forged("model.safetensors", st_unknown_dtype),
        TensorFileError,
        CKPT_FIX,
    ),
    Case("checkpoint/file-changed-not-repinned", checkpoint_file_replaced, CheckpointCorruptError, CKPT_FIX),
    Case("checkpoint/state-json-truncated", checkpoint_state_truncated, ArtifactUnreadableError, CKPT_FIX),
    Case("checkpoint/optimizer-file-missing", checkpoint_optimizer_missing, CheckpointMissingError, "restore it"),
]


# --- the harness --------------------------------------------------------------------------------------


def snapshot(base: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under ``base``: kind, mode and (for files) bytes. Sparse giants are stat-only."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(base).as_posix()
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, b"")
            elif st.st_size > 64 << 20:
                out[rel] = ("big", st.st_mode, str((st.st_size, st.st_mtime_ns)).encode())
            else:
                out[rel] = ("file", st.st_mode, path.read_bytes())
    return out


@pytest.fixture(scope="module", autouse=True)
def tokenized_dataset(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One small real tokenized dataset (trained BPE, two shards) that tokenized cases copy."""
    base = tmp_path_factory.mktemp("tokenized")
    corpus = base / "corpus"
    records = [{"id": f"d{i}", "text": f"def f{i}(x):\n    return x * {i}\n" * 8} for i in range(40)]
    write_dataset(records, corpus, docs_per_shard=16, level=3)
    tokenizer = {"vocab_size": 300, "min_frequency": 2, "special_tokens": ["<|endoftext|>", "<|pad|>"], "seed": 1}
    recipe = {
        "tokenizer": tokenizer,
        "packing": {"seq_len": 32, "tail": "pad"},
        "shards": {"sequences_per_shard": 40, "zstd_level": 3},
    }
    cfg = to_config(TokenizeConfig, recipe, where="tokenize")
    out = base / "tok"
    out.mkdir()
    run_tokenize(cfg, corpus, out)
    _TOKENIZED[:] = [out]


def test_catalogue_is_large_and_named() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids), "case ids must be unique"
    areas = {i.split("/")[0] for i in ids}
    assert areas == {"manifest", "envelope", "key", "recipe", "corpus", "checkpoint"}
    assert sum(1 for c in CASES if "/cli-" in c.id) >= 4


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FLOWPIN_ROOT", "FLOWPIN_SIGNING_KEY", "FLOWPIN_DIGEST_ALGORITHM"):
        monkeypatch.delenv(var, raising=False)
    bad = case.build(tmp_path)
    before = snapshot(tmp_path)
    if bad.argv:
        assert bad.cwd is not None
        env = {**os.environ, "FLOWPIN_ROOT": str(bad.cwd), "DVC_NO_ANALYTICS": "1"}
        proc = subprocess.run(
            [FLOWPIN, *bad.argv], cwd=bad.cwd, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        assert f"flowpin: {case.error.__name__}: " in proc.stderr, proc.stderr
        message = proc.stderr
    else:
        assert bad.call is not None
        try:
            result = bad.call()
        except FlowpinError as exc:
            error: object = exc
            message = str(exc)
        else:  # a verify finding: the user sees "<artifact>: <ErrorClass>: <message>"
            assert isinstance(result, Finding), result
            error, message = result.error, str(result)
        assert type(error) is case.error, f"{type(error).__name__}: {error}"
    assert bad.where in message, f"the message does not say where ({bad.where}): {message}"
    assert case.fix in message, f"the message does not say how to fix it ({case.fix!r}): {message}"
    assert snapshot(tmp_path) == before, "the failed call changed files on disk"


def test_private_key_is_created_0600_even_under_umask_0(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / ".dvc").mkdir(parents=True)
    env = {**os.environ, "FLOWPIN_ROOT": str(root)}
    env.pop("FLOWPIN_SIGNING_KEY", None)
    proc = subprocess.run(
        [FLOWPIN, "key", "init"], cwd=root, env=env, capture_output=True, text=True, umask=0, check=False
    )
    assert proc.returncode == 0, proc.stderr
    key = root / ".flowpin" / "keys" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) & 0o077 == 0
    assert load_signer(root, key).keyid in load_trust_store(root)


def test_model_signing_keys_are_not_read_as_manifest_trust(tmp_path: Path) -> None:
    """keys/model-signing/*.pub (EC P-256, OpenSSF model signing) sit beside the trust store, not in it."""
    p = new_project(tmp_path)
    (p.root / "keys" / "model-signing").mkdir()
    (p.root / "keys" / "model-signing" / "ec.pub").write_bytes(public_pem(ec_key()))
    assert set(load_trust_store(p.root)) == {p.signer.keyid}
    assert keyid_of(p.signer.private.public_key()) == p.signer.keyid
