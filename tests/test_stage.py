"""flowpin.stage: which stage a run records when one script serves several DVC stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowpin.data.shards import write_dataset
from flowpin.manifest.record import record
from flowpin.manifest.statement import load_manifest
from flowpin.stage import stage_name
from flowpin.train.launcher import process_rank
from helpers import Project

REPO = Path(__file__).resolve().parents[1]

DVC_YAML = {
    "stages": {
        "mix": {
            "cmd": "python stages/mix.py",
            "deps": ["stages/mix.py", "src/flowpin/data/mix.py", "data/corpus"],
        },
        "mix_midtrain": {
            "cmd": "python stages/mix.py --config-name mix_midtrain",
            "deps": ["stages/mix.py", "data/corpus"],
        },
    }
}


def write_dvc_yaml(root: Path) -> None:
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))


@pytest.mark.parametrize(
    ("config_name", "expected"),
    [
        ("mix", "mix"),  # the reference recipe: block and stage share the name
        ("mix_midtrain", "mix_midtrain"),  # a second DVC stage of the same script: its own entry
        ("mix_full", "mix"),  # a variant run outside DVC: the block's entry (same code)
        ("", "mix"),
    ],
)
def test_stage_name_is_the_config_name_when_dvc_has_that_stage(tmp_path: Path, config_name: str, expected: str) -> None:
    write_dvc_yaml(tmp_path)
    assert stage_name("mix", config_name, tmp_path) == expected


def test_stage_name_without_dvc_yaml_is_the_block(tmp_path: Path) -> None:
    assert stage_name("mix", "mix_midtrain", tmp_path) == "mix"


def corpus() -> list[dict[str, Any]]:
    code = "def f(x):\n    '''Return x doubled, documented.'''\n    return 2 * x  # double it for the caller\n"
    return [
        {
            "id": f"stdlib/m{i}.py",
            "text": code * (20 + i),
            "source": {"origin": "python-stdlib 3.11.7", "path": f"m{i}.py"},
        }
        for i in range(6)
    ]


def test_a_second_dvc_stage_of_one_script_records_its_own_entry(project: Project) -> None:
    """`python stages/mix.py --config-name mix_midtrain`: manifest stage, path and code deps of mix_midtrain."""
    root = project.root
    write_dvc_yaml(root)
    shutil.copytree(REPO / "params", root / "params")
    (root / "stages").mkdir()
    shutil.copy2(REPO / "stages" / "mix.py", root / "stages" / "mix.py")
    (root / "src" / "flowpin" / "data").mkdir(parents=True)
    shutil.copy2(REPO / "src" / "flowpin" / "data" / "mix.py", root / "src" / "flowpin" / "data" / "mix.py")
    write_dataset(corpus(), root / "data" / "corpus", docs_per_shard=4, level=3)
    with record("corpus", recipe={}, code=[], root=root, signer=project.signer) as rec:
        rec.output("data/corpus")
    env = {**os.environ, "FLOWPIN_ROOT": str(root)}
    env.pop("FLOWPIN_SIGNING_KEY", None)
    inputs = ["paths.inputs.corpus.data=data/corpus", "paths.inputs.corpus.manifest=manifests/corpus.json"]
    for args in (["--config-name", "mix_midtrain", *inputs], inputs):
        proc = subprocess.run(
            [sys.executable, "stages/mix.py", *args], cwd=root, env=env, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def code_deps(manifest: str) -> list[str]:
        m = load_manifest(root / "manifests" / manifest)
        return [d["name"] for d in m.dependencies if d["annotations"]["kind"] == "code"]

    midtrain = load_manifest(root / "manifests" / "mix_midtrain.json")
    assert midtrain.stage == "mix_midtrain"
    assert [s["name"] for s in midtrain.subjects] == ["data/mix_midtrain"]
    assert code_deps("mix_midtrain.json") == ["stages/mix.py"]  # dvc.yaml's mix_midtrain entry, not mix's
    assert load_manifest(root / "manifests" / "mix.json").stage == "mix"
    assert code_deps("mix.json") == ["stages/mix.py", "src/flowpin/data/mix.py"]


# --- ranks: who records a stage -------------------------------------------------------------------


def test_the_rank_comes_from_the_launcher_environment_without_a_process_group() -> None:
    assert process_rank({}) == (0, 1)
    assert process_rank({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2)


def test_a_stage_that_swaps_its_output_in_refuses_a_torchrun_world(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank would build the output aside and swap it in: refused on every rank, before anything is written."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from flowpin.data.dedup import DedupConfig
    from flowpin.errors import FlowpinError
    from flowpin.recipe_schema import register_schema
    from flowpin.stage import stage_run

    # not inside a Hydra app (an earlier test of this worker may have left Hydra's run config behind)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    root = project.root
    shutil.copytree(REPO / "params", root / "params")
    register_schema("dedup")  # as stages/dedup.py does before it composes
    with initialize_config_dir(config_dir=str(root / "params"), version_base="1.3"):
        cfg = compose("dedup")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        with (
            pytest.raises(FlowpinError, match=rf"stage dedup: runs as one process, but this is rank {rank} of 2"),
            stage_run("dedup", cfg, DedupConfig, root=root, inputs=("corpus",)),
        ):
            raise AssertionError("the stage body must not run")
    assert not (root / "manifests").exists() and not (root / "reports").exists()
