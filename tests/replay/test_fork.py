"""``flowpin fork`` recomposes the parent's recipe from the entry point its manifest records (issue #14 item 8).

Hand-built parents (no training): what is checked is which config the fork composes and what it refuses,
before anything trains or is written. The training itself is covered end to end by ``test_train_stage.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from flowpin.errors import EntryPointError, MissingEntryPointError
from flowpin.manifest.record import record
from flowpin.manifest.statement import EntryPoint, load_manifest, write_manifest
from flowpin.replay import fork as fork_module
from flowpin.replay.fork import fork
from helpers import Project

VARIANT = EntryPoint(script="stages/train.py", config_name="pretrain_variant")


class Composed(Exception):
    """Raised by the stand-in for Hydra's compose: the fork got as far as composing the recipe."""


def parent(p: Project, entry: EntryPoint | None) -> Path:
    """A training-stage manifest whose first pinned config is a group option, not its primary config."""
    for name, text in (
        ("stages/train.py", "print('train')\n"),
        ("params/model/tiny.yaml", "layers: 2\n"),
        ("params/pretrain.yaml", "train: {}\n"),
        ("params/pretrain_variant.yaml", "train: {}\n"),
    ):
        (p.root / name).parent.mkdir(parents=True, exist_ok=True)
        (p.root / name).write_text(text)
    step = p.root / "runs" / "pretrain" / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(bytes(range(64)))
    with record(
        "pretrain",
        recipe={"train": {}},
        overrides=["train.loop.steps=2"],
        config_files=["params/model/tiny.yaml", "params/pretrain_variant.yaml"],
        code=["stages/train.py"],
        root=p.root,
        signer=p.signer,
        entry_point=entry,
    ) as rec:
        rec.output("runs/pretrain/checkpoints/step-000002")
    return p.manifest_path("pretrain")


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): Path(d, f).read_bytes()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_fork_composes_the_config_the_parent_records(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    path = parent(project, VARIANT)
    seen: list[tuple[str, list[str]]] = []

    def compose(config_dir: Path, name: str, overrides: list[str], *, with_hydra: bool = False) -> Any:
        assert with_hydra  # the fork applies the recipe's hydra.job.env_set (the CPU kernel pins)
        seen.append((name, list(overrides)))
        raise Composed

    monkeypatch.setattr(fork_module, "compose_recipe", compose)
    before = snapshot(project.root)
    with pytest.raises(Composed):
        fork(path, step=2, overrides=["train.loop.steps=4"], root=project.root)
    # not params/model/tiny.yaml, the first config the manifest pins (what the fork used to guess)
    assert seen == [("pretrain_variant", ["train.loop.steps=2", "train.loop.steps=4"])]
    assert snapshot(project.root) == before


def test_fork_refuses_a_parent_recorded_without_an_entry_point(project: Project) -> None:
    path = parent(project, None)
    before = snapshot(project.root)
    with pytest.raises(MissingEntryPointError) as info:
        fork(path, step=2, overrides=[], root=project.root)
    message = str(info.value)
    assert str(path) in message and "recorded before manifests pinned their entry point" in message
    assert "cannot fork it at step 2" in message and "re-run stage pretrain" in message
    assert snapshot(project.root) == before


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("configName", "pretrain", "'params/pretrain.yaml', which is not a config file the manifest pins"),
        ("script", "params/model/tiny.yaml", "which is not a code file the manifest pins"),
    ],
    ids=["unpinned-config", "script-not-code"],
)
def test_fork_refuses_a_signed_entry_point_that_names_what_is_not_pinned(
    project: Project, field: str, value: str, problem: str
) -> None:
    path = parent(project, VARIANT)
    statement = json.loads(json.dumps(load_manifest(path).statement))
    statement["predicate"]["buildDefinition"]["externalParameters"]["entryPoint"][field] = value
    write_manifest(path, statement, project.signer)  # validly signed by the trusted key
    before = snapshot(project.root)
    with pytest.raises(EntryPointError) as info:
        fork(path, step=2, overrides=[], root=project.root)
    assert problem in str(info.value)
    assert snapshot(project.root) == before
