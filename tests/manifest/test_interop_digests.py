"""What outside verifiers read (issue #13, items 13-15): every digest means what its name says.

An in-toto verifier that is not flowpin hashes an artifact by the digest name's published rule and
compares. These tests play that verifier with hashlib, zstandard and rfc8785 only (no flowpin code) over
a manifest flowpin recorded, and check the other direction too: flowpin refuses a digest set it cannot
fully check, and publishes nothing about the host unless the recipe asks.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from flowpin.canonical import canonical_json
from flowpin.errors import DigestMismatchError, RecipeError, UnsupportedAlgorithmError
from flowpin.manifest.record import RUN_CONTEXT_FIELDS, record
from flowpin.manifest.statement import load_manifest
from flowpin.signing import PAYLOAD_TYPE
from helpers import Project
from outside_verifier import rederive, statement_of


def write_zst(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))


@pytest.fixture
def recorded(project: Project) -> tuple[Path, Path]:
    """An upstream stage (a .zst shard directory and a .zst file) and a child that pins it as parent."""
    root = project.root
    write_zst(root / "data" / "up" / "shard-0.jsonl.zst", b'{"text": "alpha"}\n' * 50)
    (root / "data" / "up" / "index.json").write_text('{"shards": 1}\n')
    write_zst(root / "data" / "single.txt.zst", b"single\n" * 20)
    (root / "params").mkdir()
    (root / "params" / "up.yaml").write_text("up: {}\n")
    with record("up", recipe={"up": {}}, code=[], root=root, signer=project.signer) as rec:
        rec.input("params/up.yaml", kind="config")
        rec.output("data/up")
        rec.output("data/single.txt.zst")
    (root / "data" / "down.txt").write_text("down\n")
    with record("down", recipe={"down": {}}, code=[], root=root, signer=project.signer) as rec:
        rec.upstream(data="data/up", manifest="manifests/up.json")
        rec.output("data/down.txt")
    return project.manifest_path("up"), project.manifest_path("down")


def test_an_outside_verifier_rederives_every_digest_from_the_files(
    project: Project, recorded: tuple[Path, Path]
) -> None:
    statements = {f"manifests/{p.name}": statement_of(p) for p in recorded}
    checked = 0
    for statement in statements.values():
        entries = [*statement["subject"], *statement["predicate"]["buildDefinition"]["resolvedDependencies"]]
        for entry in entries:
            assert rederive(project.root, entry, statements) == entry["digest"], entry["name"]
            checked += len(entry["digest"])
    assert checked >= 10


def test_sha256_of_a_zst_file_is_the_sha256_of_its_bytes(project: Project, recorded: tuple[Path, Path]) -> None:
    (single,) = [s for s in statement_of(recorded[0])["subject"] if s["name"] == "data/single.txt.zst"]
    path = project.root / "data" / "single.txt.zst"
    assert single["digest"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # what sha256sum prints
    assert single["digest"]["flowpinSha256"] == hashlib.sha256(b"single\n" * 20).hexdigest()  # content identity
    (shards,) = [s for s in statement_of(recorded[0])["subject"] if s["name"] == "data/up"]
    assert set(shards["digest"]) == {"dirHash", "flowpinSha256"}  # no "sha256" on something that is not a file
    assert shards["digest"]["dirHash"] != shards["digest"]["flowpinSha256"]  # the shard is compressed


def test_a_parent_is_pinned_by_a_name_that_says_it_is_a_subject_list(recorded: tuple[Path, Path]) -> None:
    deps = statement_of(recorded[1])["predicate"]["buildDefinition"]["resolvedDependencies"]
    (parent,) = [d for d in deps if d["annotations"]["kind"] == "manifest"]
    assert set(parent["digest"]) == {"flowpinSubjectsSha256"}  # never "sha256": it is not the file's hash


def resign(project: Project, path: Path, statement: dict[str, Any]) -> None:
    path.write_text(json.dumps(project.signer.sign(PAYLOAD_TYPE, canonical_json(statement))))


def test_a_wrong_digest_beside_a_right_one_is_caught(project: Project, recorded: tuple[Path, Path]) -> None:
    statement = statement_of(recorded[0])
    (single,) = [s for s in statement["subject"] if s["name"] == "data/single.txt.zst"]
    single["digest"]["blake3"] = "0" * 64  # sha256 and flowpinSha256 stay right
    resign(project, recorded[0], statement)
    report = project.verify(recorded[0])
    assert [(f.artifact, type(f.error)) for f in report.findings] == [("data/single.txt.zst", DigestMismatchError)]
    assert "blake3" in str(report.findings[0])


@pytest.mark.parametrize(
    ("subject", "key"),
    [("data/single.txt.zst", "dirHash"), ("data/up", "sha256"), ("data/up", "blake3")],
    ids=["dirHash-on-a-file", "sha256-on-a-directory", "blake3-on-a-directory"],
)
def test_a_digest_flowpin_cannot_check_is_refused_not_skipped(
    project: Project, recorded: tuple[Path, Path], subject: str, key: str
) -> None:
    statement = statement_of(recorded[0])
    (entry,) = [s for s in statement["subject"] if s["name"] == subject]
    entry["digest"][key] = "0" * 64
    resign(project, recorded[0], statement)
    (finding,) = project.verify(recorded[0]).findings
    assert isinstance(finding.error, UnsupportedAlgorithmError)
    assert key in str(finding.error) and "re-record" in str(finding.error)


def test_every_byproduct_has_a_digest_uri_or_content(project: Project, recorded: tuple[Path, Path]) -> None:
    for path in recorded:
        for bp in statement_of(path)["predicate"]["runDetails"]["byproducts"]:
            assert {"digest", "uri", "content"} & set(bp), bp["name"]
            if "content" in bp:  # inline notes: the digest is the content's sha256, the annotations repeat it
                body = base64.b64decode(bp["content"])
                assert bp["digest"] == {"sha256": hashlib.sha256(body).hexdigest()}
                assert json.loads(body) == bp["annotations"]


def test_annotations_that_disagree_with_the_signed_content_are_caught(
    project: Project, recorded: tuple[Path, Path]
) -> None:
    statement = statement_of(recorded[0])
    (ctx,) = [b for b in statement["predicate"]["runDetails"]["byproducts"] if b["name"] == "run-context"]
    ctx["annotations"]["durationSeconds"] = 0.001
    resign(project, recorded[0], statement)
    (finding,) = project.verify(recorded[0]).findings
    assert finding.artifact == "byproduct run-context" and isinstance(finding.error, DigestMismatchError)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_a_manifest_publishes_no_host_user_or_absolute_path_by_default(
    project: Project, recorded: tuple[Path, Path]
) -> None:
    for path in recorded:
        statement = statement_of(path)
        ctx = next(b for b in statement["predicate"]["runDetails"]["byproducts"] if b["name"] == "run-context")
        assert not set(RUN_CONTEXT_FIELDS) & set(ctx["annotations"])
        assert "durationSeconds" in ctx["annotations"]
        text = json.dumps(statement)
        assert str(project.root) not in text
        assert [s for s in _strings(statement) if s.startswith("/")] == []


def test_the_recipe_chooses_what_the_run_context_publishes(project: Project) -> None:
    (project.root / "out.txt").write_text("x\n")
    with record("s", recipe={}, code=[], root=project.root, signer=project.signer, publish=("hostname", "pid")) as rec:
        rec.output("out.txt")
    ctx = next(
        b for b in load_manifest(project.manifest_path("s")).run_details["byproducts"] if b["name"] == "run-context"
    )
    assert {"hostname", "pid"} <= set(ctx["annotations"]) and "cwd" not in ctx["annotations"]
    with (
        pytest.raises(RecipeError, match=r"provenance.run_context.*'password'"),
        record("s", recipe={}, code=[], root=project.root, signer=project.signer, publish=("password",)),
    ):
        pass
