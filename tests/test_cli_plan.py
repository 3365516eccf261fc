"""``flowpin plan``: exit 0 when the recipe's plan fits, 2 (PlanError, with the numbers) when it does not, 2 for
an input error; overrides after the options; the recipe by name or by path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flowpin.cli import main
from helpers import BIN, REPO


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("FLOWPIN_ROOT", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_dp_only_7b_recipe_is_refused_at_80gib_with_its_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "pretrain_multinode", "--gpus", "32", "--gpu-memory", "80GiB")
    assert code == 2
    assert "DOES NOT FIT" in out and "optimizer" in out  # the plan is printed first
    assert err.startswith("flowpin: PlanError: the plan needs")
    assert "GiB (131.4 GB) before activations" in err  # 18 bytes x 7.30B parameters: nothing sharded


@pytest.mark.parametrize(("recipe", "gpus"), [("pretrain_olmo3_7b", "512"), ("params/pretrain_olmo3_32b.yaml", "1024")])
def test_the_paper_scale_recipes_fit(capsys: pytest.CaptureFixture[str], recipe: str, gpus: str) -> None:
    code, out, err = run(capsys, recipe, "--gpus", gpus)
    assert code == 0, err
    assert f"{gpus} GPUs of 80.0 GiB" in out and "fits" in out and "communication per step" in out


def test_overrides_follow_the_options_and_change_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "pretrain", "--gpus", "2", "train.layout.tensor=2", "train.layout.sequence_parallel=true"
    )
    assert code == 0 and "tensor 2, sequence parallel" in out
    code, _, err = run(capsys, "pretrain_olmo3_7b", "--gpus", "512", "train.layout.context=1")
    assert code == 2 and "PlanError" in err  # the megatron recipe's context parallelism is what makes 7B fit


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pretrain", "--gpus", "3", "train.layout.tensor=2"], "RecipeError: train.layout: a model replica spans"),
        (["pretrain", "--gpus", "1", "train.layout.expert=2"], "train.layout.expert"),
        (["pretrain", "--gpus", "1", "train.layout.tensr=2"], "does not compose"),
        (["sft"], "no train block and model group"),
        (["no_such_recipe"], "no such recipe"),
    ],
)
def test_an_input_error_exits_2_naming_it(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err, err


def test_a_bad_memory_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        run(capsys, "pretrain", "--gpu-memory", "80XB")
    assert done.value.code == 2 and "not a memory size" in capsys.readouterr().err


def test_the_installed_command_exits_2_when_the_plan_does_not_fit(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "flowpin"), "plan", "pretrain", "--gpus", "1", "--gpu-memory", "100MB"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "flowpin: PlanError:" in proc.stderr and "usable (10% margin)" in proc.stdout
