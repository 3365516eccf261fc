"""flowpin.dvcfile: dvc.yaml and dvc.lock read in one place, every malformation one named error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from flowpin.dvcfile import (
    DVC_LOCK,
    DVC_YAML,
    DvcStage,
    dvc_code_deps,
    flow_stage,
    parse_lock,
    read_flow,
    write_flow,
)
from flowpin.errors import DvcFileError, ManifestError, RecipeError
from helpers import REPO


def _flow(tmp_path: Path, text: str) -> Path:
    (tmp_path / DVC_YAML).write_text(text)
    return tmp_path


def test_the_reference_flow_reads_as_dvc_wrote_it() -> None:
    """Every stage of the repository's dvc.yaml, with the deps, params and outs the raw YAML lists."""
    raw = yaml.safe_load((REPO / DVC_YAML).read_text())["stages"]
    stages = read_flow(REPO)
    assert stages is not None and list(stages) == list(raw)
    for name, entry in raw.items():
        first = [d if isinstance(d, str) else next(iter(d)) for d in entry.get("deps") or []]
        assert stages[name].deps == tuple(first)
        code = [d.rstrip("/") for d in first if d.startswith(("stages/", "src/"))]
        assert dvc_code_deps(REPO, name) == stages[name].code_deps == code  # what the manifests pin, in order
        assert f"params/{name}.yaml" in stages[name].params or name not in {"synth", "pretrain"}
    assert dvc_code_deps(REPO, "no_such_stage") is None and flow_stage(REPO, "no_such_stage") is None


def test_entries_as_paths_or_mappings_and_code_deps_without_a_trailing_slash(tmp_path: Path) -> None:
    root = _flow(
        tmp_path,
        "stages:\n"
        "  s:\n"
        "    cmd: python stages/s.py\n"
        "    deps: [stages/s.py, {src/flowpin/data/: {}}, data/raw, src/flowpin/stage.py]\n"
        "    params: [params/s.yaml, {params/common.yaml: [seed]}]\n"
        "    outs: [data/s, {reports/s.json: {cache: false}}]\n"
        "  empty:\n",
    )
    assert read_flow(root) == {
        "s": DvcStage(
            name="s",
            deps=("stages/s.py", "src/flowpin/data/", "data/raw", "src/flowpin/stage.py"),
            params=("params/s.yaml", "params/common.yaml"),
            outs=("data/s", "reports/s.json"),
        ),
        "empty": DvcStage(name="empty", deps=(), params=(), outs=()),
    }
    assert dvc_code_deps(root, "s") == ["stages/s.py", "src/flowpin/data", "src/flowpin/stage.py"]
    assert dvc_code_deps(root, "empty") == []


def test_no_dvc_yaml_is_no_flow_and_an_empty_one_has_no_stage(tmp_path: Path) -> None:
    assert read_flow(tmp_path) is None and dvc_code_deps(tmp_path, "s") is None
    assert read_flow(_flow(tmp_path, "")) == {}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("stages: [\n", "not valid YAML"),
        ("- a\n", "not a mapping (list)"),
        ("stages: [a, b]\n", "stages is not a mapping"),
        ("stages:\n  s: [a]\n", "stages.s is not a mapping"),
        ("stages:\n  s:\n    deps: stages/s.py\n", "stages.s.deps is not a list"),
        ("stages:\n  s:\n    outs: [3]\n", "stages.s.outs[0]: 3 is neither a path"),
        ("stages:\n  s:\n    deps: [{}]\n", "stages.s.deps[0]"),
    ],
)
def test_a_malformed_dvc_yaml_is_one_named_error(tmp_path: Path, text: str, named: str) -> None:
    root = _flow(tmp_path, text)
    with pytest.raises(DvcFileError, match=re.escape(named)) as info:
        dvc_code_deps(root, "s")
    assert "fix dvc.yaml" in str(info.value) and str(root / DVC_YAML) in str(info.value)
    # what recording, rebuild and `flowpin exp` caught before (ManifestError, RecipeError) still catches it
    assert isinstance(info.value, ManifestError) and isinstance(info.value, RecipeError)


def test_the_reference_lock_file_lists_its_stages_and_raw_outs() -> None:
    raw = yaml.safe_load((REPO / DVC_LOCK).read_bytes())["stages"]
    locked = parse_lock((REPO / DVC_LOCK).read_bytes(), "dvc.lock")
    assert list(locked) == list(raw)
    for name, stage in locked.items():
        assert stage.name == name and list(stage.outs) == raw[name].get("outs", [])


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"", "not a DVC lock file"),
        (b"[1]\n", "not a DVC lock file (list)"),
        (b"stages: {\n", "not valid YAML"),
        (b"stages: [s]\n", "stages is not a mapping"),
        (b"stages:\n  s: 3\n", "stages.s is not a mapping"),
        (b"stages:\n  s:\n    outs: {path: x}\n", "stages.s.outs is not a list"),
    ],
)
def test_a_malformed_lock_file_is_one_named_error(data: bytes, named: str) -> None:
    with pytest.raises(DvcFileError, match=re.escape(named)) as info:
        parse_lock(data, "x/dvc.lock")
    assert str(info.value).startswith("x/dvc.lock") and "regenerate it with `dvc repro`" in str(info.value)


def test_a_written_flow_reads_back(tmp_path: Path) -> None:
    write_flow(tmp_path, {"s": {"cmd": "python stages/s.py --config-name s", "deps": ["stages/s.py", "src/x.py"]}})
    assert (tmp_path / DVC_YAML).read_text().startswith("stages:\n  s:\n    cmd: python stages/s.py")
    assert dvc_code_deps(tmp_path, "s") == ["stages/s.py", "src/x.py"]
