"""Hostile manifests handed to the commands that *consume* them (issue #13, items 1, 2, 5 and 12).

A manifest is only evidence once it verifies. Each case below hands a consumer -- fork, rebuild, lineage,
batch, a stage pinning its parent, eval's decontamination check, show, diff, verify -- a manifest that is
re-signed by a key nobody trusts, or whose pinned artifact changed, or that carries terminal escapes, and
asserts the named error (:class:`~flowpin.errors.UnverifiedManifestError`), a message that says where and
how to fix it, and that nothing was written; or, for read-only commands, that the output says UNVERIFIED and
shows every control character escaped. Lineage must be linear in manifests + edges (>= 1,000 manifests).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowpin.canonical import canonical_json
from flowpin.cli import main
from flowpin.display import safe
from flowpin.errors import UnverifiedManifestError
from flowpin.hashing import hash_bytes
from flowpin.manifest.digests import subjects_key
from flowpin.manifest.record import record
from flowpin.manifest.statement import load_manifest
from flowpin.signing import PAYLOAD_TYPE, Signer, init_key
from helpers import Project

FLOWPIN = str(Path(sys.executable).parent / "flowpin")
FIX_KEY = "add the signer's public key to keys/"
FIX_RESTORE = "restore the artifacts (dvc checkout"
FORGED = "\n\x1b[32mall outputs verified OK\x1b[0m"


# --- builders -----------------------------------------------------------------------------------------


def stranger(tmp_path: Path) -> Signer:
    """A valid Ed25519 key that the project does not trust."""
    return init_key(tmp_path / "elsewhere", key_path=tmp_path / "elsewhere" / "k.key")


def resign(path: Path, signer: Signer, mutate: Callable[[dict[str, Any]], None] = lambda st: None) -> None:
    """Re-sign ``path``'s (optionally changed) statement with ``signer``, bypassing the writer's checks."""
    env = json.loads(path.read_bytes())
    statement = json.loads(base64.b64decode(env["payload"]))
    mutate(statement)
    path.write_text(json.dumps(signer.sign(PAYLOAD_TYPE, canonical_json(statement)), indent=2, sort_keys=True))


def snapshot(base: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory under ``base``."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), base)] = None
        for name in filenames:
            path = Path(dirpath) / name
            out[os.path.relpath(path, base)] = path.read_bytes()
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    monkeypatch.setenv("FLOWPIN_ROOT", str(project.root))
    monkeypatch.chdir(project.root)
    return project


def training_parent(p: Project) -> Path:
    """A hand-built training-stage manifest (no training): a primary recipe and two checkpoint directories."""
    (p.root / "params").mkdir(exist_ok=True)
    (p.root / "params" / "pretrain.yaml").write_text("train: {}\n")
    ckpts = p.root / "runs" / "pretrain" / "checkpoints"
    for step in (1, 2):
        d = ckpts / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(bytes(range(64)) * step)
        (d / "state.json").write_text(json.dumps({"step": step}))
    with record("pretrain", recipe={"train": {}}, code=[], root=p.root, signer=p.signer) as rec:
        rec.input("params/pretrain.yaml", kind="config")
        for step in (1, 2):
            rec.output(f"runs/pretrain/checkpoints/step-{step:06d}")
    return p.manifest_path("pretrain")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))


def assert_refused(exc: pytest.ExceptionInfo[UnverifiedManifestError], where: str, fix: str) -> None:
    message = str(exc.value)
    assert type(exc.value) is UnverifiedManifestError, type(exc.value)
    assert where in message, message
    assert fix in message, message
    assert exc.value.findings, "the error lists its findings"


# --- item 1: consumers verify before they produce or judge anything ------------------------------------


def test_fork_refuses_a_parent_resigned_by_an_unknown_key(project: Project, tmp_path: Path) -> None:
    from flowpin.replay.fork import fork

    parent = training_parent(project)
    step2 = project.root / "runs" / "pretrain" / "checkpoints" / "step-000002"
    flip_byte(step2 / "model.safetensors")  # the attack: one flipped byte, re-pinned, re-signed by another key
    (step2 / "state.json").write_text(json.dumps({"step": 2, "repinned": True}))
    with record("pretrain", recipe={"train": {}}, code=[], root=project.root, signer=stranger(tmp_path)) as rec:
        rec.input("params/pretrain.yaml", kind="config")
        for step in (1, 2):
            rec.output(f"runs/pretrain/checkpoints/step-{step:06d}")
    before = snapshot(project.root)
    with pytest.raises(UnverifiedManifestError) as exc:
        fork(parent, step=2, overrides=["train.loop.steps=3"], root=project.root)
    assert_refused(exc, str(parent), FIX_KEY)
    assert "UntrustedKeyError" in str(exc.value)
    assert snapshot(project.root) == before
    assert not (project.root / "runs" / "forks").exists()


def test_fork_refuses_a_checkpoint_whose_bytes_changed(project: Project) -> None:
    from flowpin.replay.fork import fork

    parent = training_parent(project)
    flip_byte(project.root / "runs" / "pretrain" / "checkpoints" / "step-000002" / "model.safetensors")
    before = snapshot(project.root)
    with pytest.raises(UnverifiedManifestError) as exc:
        fork(parent, step=2, overrides=[], root=project.root)
    assert_refused(exc, "runs/pretrain/checkpoints/step-000002", FIX_RESTORE)
    assert "model.safetensors" in str(exc.value)
    assert snapshot(project.root) == before


def test_rebuild_refuses_an_untrusted_manifest_before_making_a_workspace(project: Project, tmp_path: Path) -> None:
    from flowpin.replay.rebuild import RebuildOptions, rebuild_manifest

    path = project.record_stage("train")
    resign(path, stranger(tmp_path))
    workdir = tmp_path / "ws"
    with pytest.raises(UnverifiedManifestError) as exc:
        rebuild_manifest(path, root=project.root, options=RebuildOptions(workdir=workdir))
    assert_refused(exc, str(path), FIX_KEY)
    assert not workdir.exists()


def test_stage_refuses_a_parent_signed_by_an_unknown_key(project: Project, tmp_path: Path) -> None:
    prep = project.record_stage("prep")
    resign(prep, stranger(tmp_path))
    with pytest.raises(UnverifiedManifestError) as exc:
        project.record_stage("train", parents=["manifests/prep.json"])
    assert_refused(exc, "manifests/prep.json", FIX_KEY)
    assert "record stage train" in str(exc.value)
    assert not project.manifest_path("train").exists()


def test_stage_refuses_upstream_data_that_differs_from_its_verified_manifest(project: Project) -> None:
    project.record_stage("prep")
    (project.root / "artifacts" / "prep" / "shards" / "a.txt").write_text("swapped after prep signed\n")
    (project.root / "artifacts" / "child").mkdir(parents=True)
    (project.root / "artifacts" / "child" / "out.txt").write_text("x\n")
    child = record("child", recipe={}, code=[], root=project.root, signer=project.signer)
    with pytest.raises(UnverifiedManifestError) as exc, child as rec:
        rec.upstream(data="artifacts/prep/shards", manifest="manifests/prep.json")
        rec.output("artifacts/child/out.txt")
    assert_refused(exc, "artifacts/prep/shards", FIX_RESTORE)
    assert not project.manifest_path("child").exists()


def test_batch_refuses_a_tokenize_manifest_signed_by_an_unknown_key(project: Project, tmp_path: Path) -> None:
    from flowpin.data.order import batch_target

    path = project.record_stage("tokenize", recipe={"tokenize": {"order": {"seed": 1, "batch_size": 2}}})
    resign(path, stranger(tmp_path))
    with pytest.raises(UnverifiedManifestError) as exc:
        batch_target(path, project.root)
    assert_refused(exc, str(path), FIX_KEY)


def test_eval_refuses_a_decontamination_manifest_signed_by_an_unknown_key(project: Project, tmp_path: Path) -> None:
    from flowpin.post.eval_inputs import load_decontamination

    path = project.record_stage("decontaminate")
    resign(path, stranger(tmp_path))
    (project.root / "reports").mkdir()
    (project.root / "reports" / "decontaminate.json").write_text("{}\n")
    with pytest.raises(UnverifiedManifestError) as exc:
        load_decontamination(
            project.root / "reports" / "decontaminate.json",
            report_name="reports/decontaminate.json",
            manifest=path,
            synth_name="data/synth",
            synth_digest={"sha256": "0" * 64},
            root=project.root,
        )
    assert_refused(exc, str(path), FIX_KEY)


# --- item 2: read-only commands say VERIFIED / UNVERIFIED and escape what they print -------------------


def test_show_says_unverified_for_a_stranger_signature(cli: Project, tmp_path: Path, capsys: Any) -> None:
    path = cli.record_stage("train")
    code, out, _ = run(capsys, "show", path)
    assert code == 0
    assert f"signature  VERIFIED (signed by {cli.signer.keyid[:16]}…" in out
    intruder = stranger(tmp_path)
    resign(path, intruder)
    code, out, err = run(capsys, "show", path)
    assert code == 1
    assert "signature  UNVERIFIED: " in out and "UntrustedKeyError" in out and FIX_KEY in out
    assert "signature  VERIFIED" not in out and f"VERIFIED (signed by {intruder.keyid[:16]}" not in out
    assert "UNVERIFIED" in err
    code, out, err = run(capsys, "show", path, "--json")  # JSON stays the statement; the verdict on stderr
    assert code == 1 and json.loads(out)["_type"] and "UNVERIFIED" in err


def test_show_says_unverified_for_a_garbage_signature(cli: Project, capsys: Any) -> None:
    path = cli.record_stage("train")
    env = json.loads(path.read_bytes())
    env["signatures"] = [{"keyid": "deadbeef" * 8, "sig": base64.b64encode(b"garbage").decode()}]
    path.write_text(json.dumps(env))
    code, out, _ = run(capsys, "show", path)
    assert code == 1
    assert "UNVERIFIED" in out and "VERIFIED (signed by" not in out


def test_show_escapes_a_forged_line_in_a_signed_manifest(cli: Project, capsys: Any) -> None:
    path = cli.record_stage("train")

    def forge(st: dict[str, Any]) -> None:
        st["predicate"]["buildDefinition"]["externalParameters"]["overrides"] = [f"lr=0.1{FORGED}", "x=\u202eevil"]

    resign(path, cli.signer, forge)  # signed by the trusted key: escaping must not depend on trust
    code, out, _ = run(capsys, "show", path)
    assert code == 0
    assert "\x1b" not in out and "\u202e" not in out
    assert not any(line.startswith("\x1b") or line.startswith("all outputs") for line in out.splitlines())
    assert "lr=0.1\\x0a\\x1b[32mall outputs verified OK\\x1b[0m" in out
    assert "x=\\u202eevil" in out


def test_show_digests_option_re_hashes_and_says_so(cli: Project, capsys: Any) -> None:
    path = cli.record_stage("train")
    code, out, _ = run(capsys, "show", path, "--digests")
    assert code == 0 and "every digest re-hashed" in out
    (cli.root / "artifacts" / "train" / "model.bin").write_bytes(b"other\n")
    code, out, _ = run(capsys, "show", path)
    assert code == 0 and "digests not re-hashed" in out
    code, out, _ = run(capsys, "show", path, "--digests")
    assert code == 1 and "UNVERIFIED" in out and "artifacts/train/model.bin" in out


def test_diff_marks_each_manifest_verified_or_not(cli: Project, tmp_path: Path, capsys: Any) -> None:
    a = cli.record_stage("train", manifest="runs/a/train.json")
    b = cli.record_stage("train", manifest="runs/b/train.json")
    resign(b, stranger(tmp_path))
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 0  # the content is identical; the verdict line names the manifest nobody vouches for
    verdict, pair = out.splitlines()[:2]
    assert verdict.endswith(f"; UNVERIFIED 1 of 2 manifests: {b}")
    assert f"{a} VERIFIED (signed by {cli.signer.keyid[:16]}…)" in pair and f"{b} UNVERIFIED" in pair
    assert "UntrustedKeyError" in out
    code, out, _ = run(capsys, "diff", a, b, "--json")
    doc = json.loads(out)
    (result,) = doc["diffs"]
    assert result["verified"]["a"]["verified"] is True and result["verified"]["b"]["verified"] is False
    assert doc["verdict"]["unverified"] == [str(b)] and doc["verdict"]["signaturesChecked"] == 2


def test_diff_escapes_recipe_values(cli: Project, capsys: Any) -> None:
    a = cli.record_stage("train", recipe={"lr": 0.1}, manifest="runs/a/train.json")
    b = cli.record_stage("train", recipe={"lr": f"0.2{FORGED}"}, manifest="runs/b/train.json")
    code, out, _ = run(capsys, "diff", a, b)
    assert code == 3
    assert "\x1b" not in out and "\\x1b[32mall outputs" in out
    assert not any(line.startswith("all outputs") for line in out.splitlines())


def test_lineage_marks_an_unverified_node(cli: Project, tmp_path: Path, capsys: Any) -> None:
    cli.record_stage("prep")
    train = cli.record_stage("train", parents=["manifests/prep.json"])
    resign(cli.manifest_path("prep"), stranger(tmp_path))  # same statement, so the pin still matches
    code, out, err = run(capsys, "lineage", train)
    assert code == 1
    assert f"manifests/train.json [train] VERIFIED (signed by {cli.signer.keyid[:16]}…)" in out
    assert "manifests/prep.json [prep] UNVERIFIED" in out
    assert "manifests/prep.json: UNVERIFIED" in err and FIX_KEY in err
    code, out, _ = run(capsys, "lineage", train, "--json")
    node = json.loads(out)
    assert node["verified"] is True and node["parents"][0]["verified"] is False


def test_verify_escapes_finding_messages(cli: Project, capsys: Any) -> None:
    path = cli.record_stage("train")

    def forge(st: dict[str, Any]) -> None:
        st["predicate"]["buildDefinition"]["externalParameters"]["stage"] = "train"
        st["subject"][0]["annotations"]["flowpin.size"] = 1

    resign(path, cli.signer, forge)
    (cli.root / "artifacts" / "train" / "model.bin").write_bytes(b"\x1b[32mchanged\n")
    env = json.loads(path.read_bytes())
    env["signatures"][0]["keyid"] = f"k{FORGED}"  # an attacker keyid lands in the UntrustedKeyError message
    path.write_text(json.dumps(env))
    code, out, _ = run(capsys, "verify", path)
    assert code == 1
    assert "\x1b" not in out and "\\x1b[32mall" in out
    assert not any(line.startswith("all outputs") for line in out.splitlines())


def test_safe_escapes_controls_and_bidi_but_not_text() -> None:
    assert (
        safe("a\nb\tc\x7f\x9b\u202e\u2066\u2028\U000e0001") == "a\\x0ab\\x09c\\x7f\\x9b\\u202e\\u2066\\u2028\\U000e0001"
    )
    assert safe("données → 模型 … ok") == "données → 模型 … ok"
    assert safe(3) == "3"


# --- item 5: lineage is linear in manifests + edges -----------------------------------------------------

WIDTH, LEVELS = 34, 30  # 1,020 manifests, 2 parents each, + one top manifest naming the last level


def _dag(p: Project) -> Path:
    """A 30-level DAG (each node's parents: two neighbours one level down): ~2^30 root-to-leaf paths."""
    template = load_manifest(p.record_stage("seed")).statement
    template["predicate"]["buildDefinition"]["resolvedDependencies"] = []
    subject = template["subject"][0]
    key = subjects_key("sha256")
    pins: dict[str, str] = {}

    def write(name: str, parents: list[str]) -> None:
        st = copy.deepcopy(template)
        st["predicate"]["buildDefinition"]["externalParameters"]["stage"] = name
        st["subject"] = [{**subject, "name": f"artifacts/{name}"}]
        st["predicate"]["buildDefinition"]["resolvedDependencies"] = [
            {
                "name": f"manifests/{q}.json",
                "digest": {key: pins[q]},
                "annotations": {"flowpin.type": "manifest", "flowpin.stage": q, "kind": "manifest"},
            }
            for q in parents
        ]
        envelope = p.signer.sign(PAYLOAD_TYPE, canonical_json(st))  # the writer's checks: lineage reads them all
        (p.root / "manifests" / f"{name}.json").write_text(json.dumps(envelope))
        pins[name] = hash_bytes(canonical_json(st["subject"]), "sha256")

    for level in range(LEVELS):
        for j in range(WIDTH):
            below = [] if level == 0 else [f"n{level - 1}_{j}", f"n{level - 1}_{(j + 1) % WIDTH}"]
            write(f"n{level}_{j}", below)
    write("top", [f"n{LEVELS - 1}_{j}" for j in range(WIDTH)])
    return p.root / "manifests" / "top.json"


def test_lineage_of_a_thousand_manifest_dag_is_linear(project: Project) -> None:
    top = _dag(project)
    env = {**os.environ, "FLOWPIN_ROOT": str(project.root)}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [FLOWPIN, "lineage", str(top)], cwd=project.root, env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("flowpin lineage did not finish in 60 s on 1,021 manifests: it is not linear")
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    labels = [line for line in lines if "manifests/" in line and "[" in line]
    expanded = [line for line in labels if "(see above)" not in line]
    nodes, edges = WIDTH * LEVELS + 1, WIDTH * 2 * (LEVELS - 1) + WIDTH
    assert len(expanded) == nodes  # each manifest once (the seed manifest is no one's parent)
    assert len(labels) == edges + 1  # one line per edge, plus the start
    assert all("UNVERIFIED" not in line for line in labels)
    assert seconds < 30, f"{seconds:.1f} s"


def test_lineage_checks_each_edge_of_a_shared_parent(cli: Project, capsys: Any) -> None:
    cli.record_stage("prep")
    a = cli.record_stage("a", parents=["manifests/prep.json"])
    with record("prep", recipe={}, code=[], root=cli.root, signer=cli.signer) as rec:  # prep records other outputs
        (cli.root / "artifacts" / "prep" / "model.bin").write_bytes(b"other\n")
        rec.output("artifacts/prep/model.bin")
    cli.record_stage("b", parents=["manifests/prep.json"])  # pins the new outputs
    with record("top", recipe={}, code=[], root=cli.root, signer=cli.signer) as rec:
        rec.parent(a)
        rec.parent("manifests/b.json")
        rec.output("artifacts/a/model.bin")
    code, out, err = run(capsys, "lineage", cli.manifest_path("top"))
    assert code == 1
    assert err.count("outputs changed since the child pinned them") == 1  # a's edge, not b's
    assert out.count("manifests/prep.json [prep]") == 2 and "(see above)" in out


# --- item 12: a closed pipe ends the command quietly ----------------------------------------------------


def test_show_into_a_closed_pipe_exits_quietly(project: Project) -> None:
    path = project.record_stage("train")

    def many_outputs(st: dict[str, Any]) -> None:
        subject = st["subject"][0]
        st["subject"] = [{**subject, "name": f"artifacts/out/{i:05d}.bin"} for i in range(4000)]

    resign(path, project.signer, many_outputs)  # ~400 KB of output, far more than a pipe buffer
    env = {**os.environ, "FLOWPIN_ROOT": str(project.root)}
    proc = subprocess.Popen(
        [FLOWPIN, "show", str(path)], cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"manifest")  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
