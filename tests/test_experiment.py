"""`flowpin exp` (`dvc exp run -S` on the flow): overrides planned and checked by flowpin.experiment, signed
manifests out.

The planning tests read the repository's own params/ (fast). The end-to-end tests run real experiments
on the `synth` stage of a scratch project (seconds each): in the workspace and in a temporary copy.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from flowpin.cli import main
from flowpin.errors import RecipeError
from flowpin.experiment import plan_experiment
from flowpin.manifest.statement import load_manifest
from helpers import BIN, REPO, checked, copy_project, run_in

DVC = str(BIN / "dvc")
FLOWPIN = str(BIN / "flowpin")


# --- planning: the command-line overrides become -S values DVC applies to params/<stage>.yaml --------


def test_values_group_choices_and_group_keys_become_file_overrides() -> None:
    plan = plan_experiment(
        "pretrain", ["train.loop.steps=10", "model=tiny_wide", "train.loop.optim.schedule.peak_lr=1e-3"], root=REPO
    )
    assert plan.set_params == (
        "params/pretrain.yaml:train.loop.steps=10",
        "params/pretrain.yaml:defaults.2.model=tiny_wide",  # the defaults-list entry, the only form DVC can edit
        "params/pretrain.yaml:train.loop.optim.schedule.peak_lr=1e-3",
    )
    assert plan.argv(name="short") == [
        "dvc",
        "exp",
        "run",
        "--name",
        "short",
        *[arg for value in plan.set_params for arg in ("--set-param", value)],
        "pretrain",
    ]
    # A key of the model group: set in the primary file, which overrides the group as the command line does.
    plan = plan_experiment("pretrain", ["model.hidden_size=256"], root=REPO)
    assert plan.set_params == ("params/pretrain.yaml:+model.hidden_size=256",)
    # A key the primary file holds itself (longctx sets model.yarn): edited in place.
    plan = plan_experiment("longctx", ["model.yarn.scale_factor=2.0"], root=REPO)
    assert plan.set_params == ("params/longctx.yaml:model.yarn.scale_factor=2.0",)


@pytest.mark.parametrize(
    ("stage", "overrides", "named"),
    [
        ("pretrain", ["train.loop.stepz=3"], "train.loop.stepz"),  # a typo: refused before DVC stashes anything
        ("pretrain", ["model=no_such_model"], "model/no_such_model"),
        ("pretrain", ["+model=tiny"], "config group 'model'"),
        ("pretrain", ["~model"], "config group 'model'"),
        ("pretrain", ["model@m=tiny"], "package overrides"),
        ("synth", ["synth.arithmetic.train=[1"], "not Hydra override syntax"),
        ("pretrain_multinode", ["train.loop.steps=1"], "not in dvc.yaml"),  # a recipe, not a stage of the flow
    ],
)
def test_what_dvc_could_not_apply_is_refused_by_name(stage: str, overrides: list[str], named: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(named)):
        plan_experiment(stage, overrides, root=REPO)


def test_a_sweep_needs_the_queue_and_every_combination_is_checked() -> None:
    plan = plan_experiment("synth", ["synth.arithmetic.train=100,200"], root=REPO)
    assert plan.sweep and plan.set_params == ("params/synth.yaml:synth.arithmetic.train=100,200",)
    with pytest.raises(RecipeError, match="--queue"):
        plan.argv()
    assert "--queue" in plan.argv(queue=True)
    with pytest.raises(RecipeError, match="model/nope"):
        plan_experiment("pretrain", ["model=tiny_wide,nope"], root=REPO)


def test_an_isolated_run_brings_the_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWPIN_SIGNING_KEY", raising=False)
    plan = plan_experiment("synth", ["synth.seed=7"], root=REPO)
    assert plan.argv()[3:5] == ["--set-param", "params/synth.yaml:synth.seed=7"]  # the workspace has the key
    assert "--copy-paths" in plan.argv(temp=True) and ".flowpin/keys" in plan.argv(queue=True)
    monkeypatch.setenv("FLOWPIN_SIGNING_KEY", "/keys/signing.key")
    assert "--copy-paths" not in plan.argv(temp=True)


# --- flowpin exp: the command line (in process; nothing run but a planned dvc command) ----------------------


def test_flowpin_exp_dry_run_prints_the_dvc_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("FLOWPIN_SIGNING_KEY", raising=False)
    # overrides may follow the options (argparse leaves them over; flowpin hands them to exp)
    assert main(["exp", "synth", "--dry-run", "--name", "seven", "synth.seed=7"]) == 0
    out = capsys.readouterr().out
    assert out == "dvc exp run --name seven --set-param params/synth.yaml:synth.seed=7 synth\n"


def test_flowpin_exp_refusals_are_input_errors_and_a_failed_dvc_run_is_a_no(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["exp", "pretrain", "train.loop.stepz=3", "--dry-run"]) == 2
    assert "flowpin: RecipeError: " in capsys.readouterr().err
    ran: list[list[str]] = []

    def failing(argv: list[str], *, root: Path) -> int:
        ran.append(argv)
        return 255

    monkeypatch.setattr("flowpin.experiment.run_experiment", failing)
    assert main(["exp", "synth", "synth.seed=7"]) == 1
    assert ran == [["dvc", "exp", "run", "--set-param", "params/synth.yaml:synth.seed=7", "synth"]]
    assert "dvc exp run failed (exit 255)" in capsys.readouterr().err


def test_a_project_without_dvc_yaml_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "params").mkdir()
    with pytest.raises(RecipeError, match=r"dvc\.yaml: no such file"):
        plan_experiment("synth", ["synth.seed=7"], root=tmp_path)


def _copy_flow(dest: Path) -> Path:
    dest.mkdir()
    shutil.copytree(REPO / "params", dest / "params")
    shutil.copy2(REPO / "dvc.yaml", dest / "dvc.yaml")
    (dest / ".dvc").mkdir()
    (dest / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    return dest


def test_dvc_hydra_mode_is_refused(tmp_path: Path) -> None:
    root = _copy_flow(tmp_path / "p")
    assert plan_experiment("synth", ["synth.seed=7"], root=root).stage == "synth"
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n[hydra]\n    enabled = true\n")
    with pytest.raises(RecipeError, match=r"params\.yaml, which no stage"):
        plan_experiment("synth", ["synth.seed=7"], root=root)


def test_the_repository_keeps_dvc_hydra_mode_off() -> None:
    config = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in config and "enabled = false" in config


def test_an_edit_that_would_compose_another_recipe_is_refused(tmp_path: Path) -> None:
    """With ``_self_`` before the group, a value written into the primary loses to the group's."""
    root = _copy_flow(tmp_path / "p")
    primary = root / "params" / "pretrain.yaml"
    odd = primary.read_text().replace("  - common/hydra\n", "  - common/hydra\n  - _self_\n")
    primary.write_text(odd.replace("  - model: tiny\n  - _self_\n", "  - model: tiny\n"))
    with pytest.raises(RecipeError, match=r"model\.hidden_size"):
        plan_experiment("pretrain", ["model.hidden_size=256"], root=root)


# --- end to end: real experiments, signed manifests -------------------------------------------------


@pytest.fixture(scope="module")
def project(synth_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_project(synth_flow, tmp_path_factory.mktemp("dvc-exp") / "p")  # committed, `dvc repro synth` run
    checked(root, "git", "add", "-A")
    checked(root, "git", "commit", "-qm", "synth baseline")
    return root


def _exp(root: Path, *args: str) -> str:
    t0 = time.monotonic()
    out = checked(root, FLOWPIN, "exp", *args)
    print(f"flowpin exp {' '.join(args)}: {time.monotonic() - t0:.1f} s")
    return out


def _exp_ref(root: Path, name: str) -> str:
    refs = checked(root, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    return next(r for r in refs if r.endswith(f"/{name}"))


def _recipe(manifest_bytes: bytes, tmp: Path) -> dict[str, object]:
    path = tmp / "m.json"
    path.write_bytes(manifest_bytes)
    m = load_manifest(path)
    return {"recipe": m.recipe, "overrides": m.overrides}


@pytest.mark.slow
def test_dvc_exp_in_a_temporary_copy_commits_a_signed_manifest(project: Path, tmp_path: Path) -> None:
    before = (project / "manifests" / "synth.json").read_bytes()
    out = _exp(project, "synth", "synth.arithmetic.train=300", "--name", "isolated", "--temp")
    assert "--copy-paths .flowpin/keys" in out and "Ran experiment(s): isolated" in out
    assert (project / "manifests" / "synth.json").read_bytes() == before  # the workspace is untouched
    ref = _exp_ref(project, "isolated")
    committed = subprocess.run(["git", "show", f"{ref}:manifests/synth.json"], cwd=project, capture_output=True)
    external = _recipe(committed.stdout, tmp_path)
    assert external["recipe"]["synth"]["arithmetic"]["train"] == 300  # type: ignore[index]


@pytest.mark.slow
def test_dvc_exp_in_the_workspace_reruns_the_stage_and_signs_its_manifest(project: Path, tmp_path: Path) -> None:
    baseline = (project / "manifests" / "synth.json").read_bytes()
    out = _exp(project, "synth", "synth.arithmetic.train=100", "--name", "small")
    assert "params/synth.yaml:synth.arithmetic.train=100" in out and "Ran experiment(s): small" in out
    manifest = project / "manifests" / "synth.json"
    external = _recipe(manifest.read_bytes(), tmp_path)
    assert external["recipe"]["synth"]["arithmetic"]["train"] == 100  # type: ignore[index]
    assert external["overrides"] == []  # the override lives in the config file the manifest pins
    assert "1 verified, 0 failed" in checked(project, FLOWPIN, "verify", "--all")
    # The experiment's commit holds the file DVC edited, the lock and the signed manifest.
    ref = _exp_ref(project, "small")
    shown = subprocess.run(["git", "show", f"{ref}:manifests/synth.json"], cwd=project, capture_output=True)
    assert shown.stdout == manifest.read_bytes()
    assert "train: 100" in checked(project, "git", "show", f"{ref}:params/synth.yaml")
    # flowpin diff against the baseline names the recipe change and the changed output.
    (tmp_path / "baseline.json").write_bytes(baseline)
    diff = run_in(project, FLOWPIN, "diff", str(tmp_path / "baseline.json"), "manifests/synth.json")
    assert diff.returncode == 1 and "synth.arithmetic.train: 4000 → 100" in diff.stdout
    shown_params = json.loads(checked(project, DVC, "params", "diff", "HEAD", "--json") or "{}")
    changed = shown_params["params/synth.yaml"]["synth.arithmetic.train"]
    assert (changed["old"], changed["new"]) == (4000, 100)
