"""Tests for the ``flowpin`` command line: verify, diff, lineage, show, key (exit codes and output)."""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import re
import time
import types
from pathlib import Path
from typing import Any

import pytest

from flowpin.canonical import canonical_json
from flowpin.cli import COMMANDS, main
from flowpin.errors import EXIT_INPUT, EXIT_INTERNAL, IntegrityError, InternalError, RecipeError, exit_code
from flowpin.hashing import hasher as hasher_module
from flowpin.manifest.record import record
from flowpin.manifest.statement import load_manifest, write_manifest
from flowpin.settings import VARIABLES
from flowpin.signing import init_key
from helpers import Project, flowpin_commands


@pytest.fixture
def cli(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    """``project`` as the current flowpin root (what ``find_root`` answers)."""
    monkeypatch.setenv("FLOWPIN_ROOT", str(project.root))
    monkeypatch.chdir(project.root)
    return project


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def record_prep_and_train(p: Project, **kwargs: Any) -> tuple[Path, Path]:
    """A two-stage flow: ``prep`` reads a raw file, ``train`` declares prep's manifest as its parent."""
    raw = p.root / "data" / "raw.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("raw corpus\n")
    prep = p.record_stage("prep", inputs=["data/raw.txt"], **kwargs)
    train = p.record_stage("train", parents=["manifests/prep.json"], **kwargs)
    return prep, train


# --- verify -------------------------------------------------------------------------------------------


def test_verify_all_ok(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    record_prep_and_train(cli)
    code, out, _ = run(capsys, "verify", "--all")
    assert code == 0, out
    assert out.count("OK   ") == 2
    assert "2 verified, 0 failed" in out


def test_verify_all_fails_after_tampering_and_names_the_artifact(
    cli: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    record_prep_and_train(cli)
    (cli.root / "artifacts" / "train" / "shards" / "a.txt").write_text("tampered\n")
    code, out, _ = run(capsys, "verify", "--all")
    assert code == 1
    assert "FAIL" in out and "[train]" in out
    assert "artifacts/train/shards: DigestMismatchError" in out
    assert "a.txt" in out
    assert "1 verified, 1 failed" in out


def test_verify_tampered_raw_input_fails_the_consumer(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    record_prep_and_train(cli)
    (cli.root / "data" / "raw.txt").write_text("other corpus\n")
    code, out, _ = run(capsys, "verify", cli.manifest_path("prep"))
    assert code == 1
    assert "data/raw.txt: DigestMismatchError" in out


def test_verify_second_run_is_answered_by_the_stat_cache(
    cli: Project, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record_prep_and_train(cli)
    # files younger than the racy window are never cached: verify as if 10 s had passed since writing
    real = time.time_ns
    monkeypatch.setattr(
        hasher_module, "time", types.SimpleNamespace(time_ns=lambda: real() + 10**10, perf_counter=time.perf_counter)
    )
    code, out, _ = run(capsys, "verify", "--all")
    assert code == 0
    hashed = int(re.search(r"(\d+) files hashed, 0 from the stat cache", out).group(1))  # type: ignore[union-attr]
    assert hashed > 0

    code, out, _ = run(capsys, "verify", "--all")
    assert code == 0
    assert f"0 files hashed, {hashed} from the stat cache" in out

    code, out, _ = run(capsys, "verify", "--all", "--no-cache")
    assert code == 0
    assert f"{hashed} files hashed, 0 from the stat cache" in out


def test_verify_without_manifests_is_an_input_error(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "verify")
    assert code == 2
    assert "nothing to verify" in err


# --- diff ---------------------------------------------------------------------------------------------


def test_diff_reports_the_changed_recipe_key(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    a = cli.record_stage("train", recipe={"lr": 0.1, "model": {"layers": 2}}, manifest="runs/a/train.json")
    b = cli.record_stage("train", recipe={"lr": 0.1, "model": {"layers": 4}}, manifest="runs/b/train.json")

    code, out, _ = run(capsys, "diff", a, b)
    assert code == 3  # the outputs are the same bytes: only the identity differs
    assert "1 difference(s)" in out
    assert "[recipe]" in out
    assert "model.layers: 2 → 4" in out

    code, out, _ = run(capsys, "diff", a, b, "--json")
    assert code == 3
    (result,) = json.loads(out)["diffs"]
    assert result["identical"] is False and result["outcome"] == "identity-differs"
    assert result["changes"] == [{"section": "recipe", "key": "model.layers", "old": 2, "new": 4, "note": ""}]


def test_diff_of_rerun_with_same_inputs_is_identical(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    a = cli.record_stage("train", manifest="runs/a/train.json")
    b = cli.record_stage("train", manifest="runs/b/train.json")
    assert load_manifest(a).run_details != load_manifest(b).run_details  # times/invocation ids differ

    code, out, _ = run(capsys, "diff", a, b)
    assert code == 0
    assert "identical in identity" in out
    code, out, _ = run(capsys, "diff", a, b, "--include-run")
    assert code == 3
    assert "[run]" in out


def test_diff_reports_changed_output_digest(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    a = cli.record_stage("train", manifest="runs/a/train.json")
    cli.write_outputs("train")
    (cli.root / "artifacts" / "train" / "shards" / "a.txt").write_text("ALPHA\n")
    recipe = {"lr": 0.1, "model": {"layers": 2}}  # as in record_stage: only the output differs
    with record("train", recipe=recipe, code=[], root=cli.root, manifest="runs/b/train.json", signer=cli.signer) as rec:
        rec.output("artifacts/train/model.bin")
        rec.output("artifacts/train/shards")
    code, out, _ = run(capsys, "diff", a, cli.root / "runs/b/train.json", "--json")
    assert code == 1
    (result,) = json.loads(out)["diffs"]
    assert [(c["section"], c["key"]) for c in result["changes"]] == [("output", "artifacts/train/shards")]
    assert "a.txt" in result["changes"][0]["note"]


def test_diff_of_two_manifest_directories(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    cli.record_stage("prep", manifest="runs/a/prep.json")
    cli.record_stage("prep", manifest="runs/b/prep.json")
    cli.record_stage("train", recipe={"lr": 0.1}, manifest="runs/a/train.json")
    cli.record_stage("train", recipe={"lr": 0.2}, manifest="runs/b/train.json")
    cli.record_stage("eval", manifest="runs/b/eval.json")

    code, out, _ = run(capsys, "diff", cli.root / "runs/a", cli.root / "runs/b", "--json")
    assert code == 1
    by_file = {Path(d["b"]).name if d["b"] != "<absent>" else Path(d["a"]).name: d for d in json.loads(out)["diffs"]}
    assert set(by_file) == {"eval.json", "prep.json", "train.json"}
    assert by_file["prep.json"]["identical"] is True
    assert by_file["train.json"]["changes"] == [{"section": "recipe", "key": "lr", "old": 0.1, "new": 0.2, "note": ""}]
    assert by_file["eval.json"]["changes"][0]["note"] == "manifest only on one side"

    code, out, _ = run(capsys, "diff", cli.root / "runs/a", cli.root / "runs/a")
    assert code == 0


def test_diff_of_two_flows_says_the_verdict_first_and_exits_by_it(
    cli: Project, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue #14 item 5: a diff of two flows listed one block per stage and no verdict. The verdict comes first
    and names every pair by outcome (and every UNVERIFIED manifest); the exit status follows it: 0 identical in
    identity, 3 every output identical but identity differs, 1 some outputs differ or are on one side only."""
    for side in ("a", "b"):
        cli.record_stage("prep", manifest=f"runs/{side}/prep.json")
    cli.record_stage("train", recipe={"lr": 0.1}, manifest="runs/a/train.json")
    cli.record_stage("train", recipe={"lr": 0.2}, manifest="runs/b/train.json")  # same outputs, other recipe
    cli.record_stage("eval", manifest="runs/a/eval.json")
    (cli.root / "artifacts" / "eval" / "model.bin").write_bytes(b"other weights\n")
    stranger = init_key(tmp_path / "elsewhere", key_path=tmp_path / "elsewhere" / "k.key")
    recipe = {"lr": 0.1, "model": {"layers": 2}}  # as in record_stage: only the output differs
    with record("eval", recipe=recipe, code=[], root=cli.root, manifest="runs/b/eval.json", signer=stranger) as rec:
        rec.output("artifacts/eval/model.bin")
        rec.output("artifacts/eval/shards")
    cli.record_stage("extra", manifest="runs/b/extra.json")
    a, b = cli.root / "runs" / "a", cli.root / "runs" / "b"

    code, out, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert out.splitlines()[0] == (
        "verdict: outputs identical in 2 of 4 (1 identical in identity); outputs identical but identity differs in "
        f"1: train (recipe); outputs differ in 1: eval; only in {b}: extra; UNVERIFIED 1 of 7 manifests: "
        f"{b / 'eval.json'}"
    )
    assert out.index("[recipe]") > out.index("[output]")  # then the blocks, pair by pair (eval before train)

    code, out, _ = run(capsys, "diff", a, b, "--json")
    assert code == 1
    verdict = json.loads(out)["verdict"]
    assert (verdict["status"], verdict["exitCode"], verdict["pairs"], verdict["outputsIdentical"]) == (
        "outputs-differ",
        1,
        4,
        2,
    )
    assert verdict["identical"] == ["prep"]
    assert verdict["identityDiffers"] == [{"name": "train", "sections": ["recipe"]}]
    assert verdict["outputsDiffer"] == ["eval"]
    assert verdict["onlyIn"] == {"a": [], "b": ["extra"]}
    assert verdict["unverified"] == [str(b / "eval.json")] and verdict["signaturesChecked"] == 7

    code, out, _ = run(capsys, "diff", a / "train.json", b / "train.json")
    assert code == 3
    assert out.splitlines()[0] == (
        "verdict: outputs identical in 1 of 1 (0 identical in identity); outputs identical but identity differs in "
        "1: train (recipe); all 2 manifests VERIFIED"
    )
    code, out, _ = run(capsys, "diff", a / "prep.json", b / "prep.json")
    assert code == 0
    assert (
        out.splitlines()[0]
        == "verdict: outputs identical in 1 of 1 (1 identical in identity); all 2 manifests VERIFIED"
    )


def test_diff_of_unreadable_manifest_is_an_input_error(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    a = cli.record_stage("train")
    bad = cli.root / "bad.json"
    bad.write_text("{")
    code, _, err = run(capsys, "diff", a, bad)
    assert code == 2
    assert "ManifestParseError" in err


# --- lineage ------------------------------------------------------------------------------------------


def test_lineage_walks_to_the_parent(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    _, train = record_prep_and_train(cli)
    code, out, err = run(capsys, "lineage", train)
    assert code == 0, err
    assert "manifests/train.json [train]" in out
    assert "manifests/prep.json [prep]" in out
    assert "data/raw.txt" in out

    code, out, _ = run(capsys, "lineage", train, "--json")
    assert code == 0
    node = json.loads(out)
    assert (node["manifest"], node["stage"], node["problem"]) == ("manifests/train.json", "train", None)
    assert node["outputs"] == ["artifacts/train/model.bin", "artifacts/train/shards"]
    assert node["rawInputs"] == []
    (parent,) = node["parents"]
    assert (parent["manifest"], parent["stage"], parent["problem"], parent["parents"]) == (
        "manifests/prep.json",
        "prep",
        None,
        [],
    )
    raw_digest = hashlib.sha256(b"raw corpus\n").hexdigest()
    assert parent["rawInputs"] == [{"name": "data/raw.txt", "kind": "dataset", "digest": f"sha256:{raw_digest}"}]


def test_lineage_reports_a_missing_parent(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    prep, train = record_prep_and_train(cli)
    prep.unlink()
    code, _, err = run(capsys, "lineage", train)
    assert code == 1
    assert "manifests/prep.json" in err
    assert "missing parent" in err


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_lineage_reports_a_changed_parent(cli: Project, capsys: pytest.CaptureFixture[str], algorithm: str) -> None:
    _, train = record_prep_and_train(cli, algorithm=algorithm)
    assert run(capsys, "lineage", train)[0] == 0
    # A parent re-run that reproduces the same outputs leaves the child valid (DVC would skip it too) ...
    cli.record_stage("prep", recipe={"lr": 0.5}, inputs=["data/raw.txt"], algorithm=algorithm)
    assert run(capsys, "lineage", train)[0] == 0
    # ... one that records different outputs does not.
    with record("prep", recipe={"lr": 0.5}, code=[], root=cli.root, signer=cli.signer, algorithm=algorithm) as rec:
        (cli.root / "artifacts" / "prep" / "model.bin").write_bytes(b"other weights\n")
        rec.output("artifacts/prep/model.bin")
    code, _, err = run(capsys, "lineage", train)
    assert code == 1
    assert "outputs changed since the child pinned them" in err
    assert "manifests/prep.json" in err


def test_lineage_reports_a_cycle_and_terminates(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    _, train = record_prep_and_train(cli)
    loaded = load_manifest(train)
    template = loaded.statement  # forged below, field by field: the raw statement
    (parent_dep,) = loaded.parents

    def crafted(stage: str, parent: str) -> dict[str, Any]:
        statement = copy.deepcopy(template)
        build = statement["predicate"]["buildDefinition"]
        build["externalParameters"]["stage"] = stage
        dep = copy.deepcopy(parent_dep)
        dep["name"] = f"manifests/{parent}.json"
        dep["annotations"]["flowpin.stage"] = parent
        build["resolvedDependencies"] = [dep]
        return statement

    write_manifest(cli.root / "manifests" / "a.json", crafted("a", "b"), cli.signer)
    write_manifest(cli.root / "manifests" / "b.json", crafted("b", "a"), cli.signer)

    code, out, err = run(capsys, "lineage", cli.root / "manifests" / "a.json", "--json")
    assert code == 1
    assert "cycle: manifests/a.json → manifests/b.json → manifests/a.json" in err
    node = json.loads(out)
    assert node["stage"] == "a"
    assert node["parents"][0]["stage"] == "b"
    assert node["parents"][0]["parents"][0]["problem"].startswith("cycle")


# --- show ---------------------------------------------------------------------------------------------


def test_show_prints_stage_and_identity(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    path = cli.record_stage("train")
    statement = json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))
    identity = {"subject": statement["subject"], "buildDefinition": statement["predicate"]["buildDefinition"]}
    expected = hashlib.sha256(canonical_json(identity)).hexdigest()

    code, out, _ = run(capsys, "show", path)
    assert code == 0
    assert "stage      train" in out.splitlines()
    assert f"identity   sha256:{expected}" in out.splitlines()
    assert "artifacts/train/model.bin" in out and "artifacts/train/shards" in out

    code, out, _ = run(capsys, "show", path, "--json")
    assert code == 0
    assert json.loads(out) == statement


def test_show_identity_ignores_run_metadata_but_not_recipe(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    def identity_line(path: Path) -> str:
        out = run(capsys, "show", path)[1]
        return next(line for line in out.splitlines() if line.startswith("identity"))

    a = identity_line(cli.record_stage("train", manifest="runs/a.json"))
    b = identity_line(cli.record_stage("train", manifest="runs/b.json"))
    c = identity_line(cli.record_stage("train", recipe={"lr": 0.3}, manifest="runs/c.json"))
    assert a == b
    assert a != c


def test_show_of_missing_manifest_is_an_input_error(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "show", cli.root / "manifests" / "nope.json")
    assert code == 2
    assert "ManifestParseError" in err


# --- key ----------------------------------------------------------------------------------------------


def test_key_init_and_list(cli: Project, capsys: pytest.CaptureFixture[str]) -> None:
    key_path = cli.root / "second.key"
    code, out, _ = run(capsys, "key", "init", "--path", key_path)
    assert code == 0
    keyid = next(line.split()[1] for line in out.splitlines() if line.startswith("keyid"))
    assert run(capsys, "key", "init", "--path", key_path)[0] == 2  # exists: refused
    assert run(capsys, "key", "init", "--path", key_path, "--if-missing")[0] == 0
    code, out, _ = run(capsys, "key", "list")
    assert code == 0
    assert sorted(out.split()) == sorted([keyid, cli.signer.keyid])


# --- --help -------------------------------------------------------------------------------------------


def test_every_positional_argument_of_every_command_has_a_help_line() -> None:
    """`flowpin diff --help` etc. say what each positional is, not just its name (issue #19)."""
    commands = flowpin_commands()
    assert {("diff",), ("lineage",), ("show",), ("batch",), ("model-sign", "sign")} <= set(commands)
    positionals = {
        (" ".join(("flowpin", *path)), action.dest): action.help
        for path, parser in commands.items()
        for action in parser._actions
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction)
    }
    assert ("flowpin diff", "a") in positionals  # the walk sees them
    missing = sorted(where for where, text in positionals.items() if not text or text == argparse.SUPPRESS)
    assert missing == []


def test_help_lists_every_command_with_its_exit_status_and_every_flowpin_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`flowpin --help` names every command (key init … ui), each with its exit status, and the FLOWPIN_*
    variables; each command's own --help says its exit status; one naming style (noun, then verb)."""
    leaves = {" ".join(path) for path, parser in flowpin_commands().items() if path and not parser._subparsers}
    assert leaves == {c.name for c in COMMANDS}  # nothing missing, nothing stale
    assert {"model-sign key init", "exp"} <= leaves and "model-sign key-init" not in leaves
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    for c in COMMANDS:
        assert f"{c.name} {' '.join(c.summary.split())}" in out, c.name
        assert " ".join(f"exit {c.exits}; 2 {c.refused}".split()) in out, c.name
    assert "70 a flowpin bug" in out and "141 stdout closed early" in out
    assert all(name in out for name in VARIABLES)
    for path, parser in flowpin_commands().items():
        if " ".join(path) in leaves:
            assert "Exit status: " in (parser.description or ""), path


# --- the exit-status policy (flowpin.errors.exit_code) ------------------------------------------------


def test_exit_codes_follow_the_error_tree() -> None:
    assert exit_code(RecipeError("x")) == exit_code(IntegrityError("x")) == EXIT_INPUT == 2
    assert exit_code(InternalError("x")) == exit_code(ValueError("x")) == EXIT_INTERNAL == 70
    assert exit_code(KeyboardInterrupt()) == 130 and exit_code(BrokenPipeError()) == 141


@pytest.mark.parametrize(
    ("raised", "status", "traceback"),
    [
        (RecipeError("train.lr: must be > 0; fix it in the recipe"), 2, False),
        (InternalError("a helper was handed a negative step"), 70, True),
        (KeyError("statement"), 70, True),
        (KeyboardInterrupt(), 130, False),
    ],
)
def test_every_command_ends_by_the_policy(
    cli: Project,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    raised: BaseException,
    status: int,
    traceback: bool,
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr("flowpin.manifest.verify.verify_manifest", fail)
    record_prep_and_train(cli)
    code, _, err = run(capsys, "verify", "--all")
    assert code == status, err
    assert ("Traceback (most recent call last)" in err) is traceback, err
    assert err.splitlines()[-1].startswith("flowpin: ")
