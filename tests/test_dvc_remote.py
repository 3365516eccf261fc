"""Scale-out (docs/scale-out.md): a DVC remote round trip, and the multi-node recipe.

A scratch project replays `synth` (seconds), pushes its outputs to a local-directory remote (the same
protocol as S3), and a `git clone` that holds no private key and no DVC cache pulls them and verifies
the committed, signed manifest against the committed trusted keys; a corrupted remote object fails
loudly. The multi-node recipe (params/pretrain_multinode.yaml) composes and builds its typed configs on
CPU, and the launch environment the document asks for is the one the code sets.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

import pytest

from flowpin.errors import PrecisionError, RecipeError
from flowpin.manifest.statement import load_manifest
from flowpin.recipe import StagePaths, to_config
from helpers import BIN, REPO, checked, copy_project, run_in

DVC = str(BIN / "dvc")
FLOWPIN = str(BIN / "flowpin")
STAGE = "synth"
PROBE = "data/synth/train/index.json"
"""A plain (not zstd) output file; the tests corrupt its copy in the remote."""


@pytest.fixture(scope="module")
def origin(synth_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(project with `synth` run and committed, its local-directory remote after `dvc push`)."""
    base = tmp_path_factory.mktemp("dvc-remote")
    # committed ("flow"), then `dvc repro synth` (conftest.py)
    root, remote = copy_project(synth_flow, base / "origin"), base / "remote"
    checked(root, DVC, "remote", "add", "-d", "local", str(remote))
    checked(root, "git", "add", "-A")
    checked(root, "git", "commit", "-qm", "synth + remote")
    t0 = time.monotonic()
    checked(root, DVC, "push", STAGE)
    print(f"dvc push {STAGE}: {time.monotonic() - t0:.2f} s")
    return root, remote


def _clone(origin: Path, dest: Path, remote: Path | None = None) -> Path:
    checked(origin.parent, "git", "clone", "-q", str(origin), str(dest))
    assert not (dest / ".flowpin").exists() and not (dest / "data").joinpath("synth").exists()
    if remote is not None:  # point the clone at another remote (a local, uncommitted setting)
        checked(dest, DVC, "remote", "modify", "--local", "local", "url", str(remote))
    return dest


def _remote_object(remote: Path, path: Path) -> Path:
    md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()  # DVC's content address
    found = remote / "files" / "md5" / md5[:2] / md5[2:]
    assert found.is_file(), f"{found} not in the remote"
    return found


@pytest.mark.slow
def test_push_fresh_clone_pull_verify(origin: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = origin
    clone = _clone(root, tmp_path / "clone")
    t0 = time.monotonic()
    checked(clone, DVC, "pull", STAGE)
    t_pull = time.monotonic() - t0
    out = checked(clone, FLOWPIN, "verify", "--all")
    print(f"dvc pull {STAGE}: {t_pull:.2f} s; flowpin verify --all: {time.monotonic() - t0 - t_pull:.2f} s")
    assert "1 verified, 0 failed" in out
    pinned = {s["name"]: s["digest"] for s in load_manifest(clone / "manifests" / f"{STAGE}.json").subjects}
    assert pinned == {s["name"]: s["digest"] for s in load_manifest(root / "manifests" / f"{STAGE}.json").subjects}
    assert (clone / PROBE).read_bytes() == (root / PROBE).read_bytes()


@pytest.mark.slow
def test_a_corrupted_remote_object_fails_loudly(origin: tuple[Path, Path], tmp_path: Path) -> None:
    root, remote = origin
    bad = tmp_path / "bad-remote"
    shutil.copytree(remote, bad)
    victim = _remote_object(bad, root / PROBE)
    victim.chmod(0o644)
    victim.write_bytes(b'{"tampered": true}\n')

    # DVC's default for a remote (verify = false) trusts what it downloads: the pull succeeds...
    clone = _clone(root, tmp_path / "trusting", bad)
    checked(clone, DVC, "pull", STAGE)
    assert (clone / PROBE).read_bytes() == b'{"tampered": true}\n'
    # ...and flowpin verify names the changed file and exits 1.
    proc = run_in(clone, FLOWPIN, "verify", "--all")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DigestMismatchError" in proc.stdout and "train/index.json" in proc.stdout

    # With `verify = true` DVC re-hashes downloads itself and refuses to check the object out.
    clone = _clone(root, tmp_path / "checking", bad)
    checked(clone, DVC, "remote", "modify", "--local", "local", "verify", "true")
    pull = run_in(clone, DVC, "pull", STAGE)
    assert pull.returncode != 0 and "data/synth" in pull.stderr
    proc = run_in(clone, FLOWPIN, "verify", "--all")
    assert proc.returncode == 1 and "ArtifactMissingError" in proc.stdout


# --- the multi-node recipe ---------------------------------------------------------------------------


def test_the_multinode_recipe_composes_into_typed_configs() -> None:
    from hydra import compose, initialize_config_dir

    from flowpin.recipe_schema import register_schema
    from flowpin.train.distributed import GPU_DETERMINISM_ENV
    from flowpin.train.loop import rank_rows
    from flowpin.train.pretrain import TrainingStageConfig
    from flowpin.train.transformer import ModelConfig, check_precision, estimate_params

    register_schema("train")  # what stages/train.py stores before it composes
    with initialize_config_dir(config_dir=str(REPO / "params"), version_base="1.3"):
        cfg = compose(config_name="pretrain_multinode")
    train = to_config(TrainingStageConfig, cfg.train, where="train")
    model = to_config(ModelConfig, cfg.model, where="model")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    assert paths.manifest == "manifests/pretrain_multinode.json" and "data" in paths.inputs
    assert train.data_parallel.engine == "megatron" and not train.data_parallel.use_distributed_optimizer
    assert model.dtype == "bf16" and model.precision.fp8 == "hybrid"
    assert 7.0e9 < estimate_params(model) < 7.6e9  # the OLMo 3 7B architecture
    assert train.loop.optim.schedule.total_steps == train.loop.steps

    # The global batch splits evenly over 4 nodes x 8 GPUs; a world it does not divide is refused by name.
    assert rank_rows(train.loop.batch_size, 31, 32) == slice(496, 512)
    with pytest.raises(RecipeError, match=r"train\.batch_size"):
        rank_rows(train.loop.batch_size, 0, 24)
    # FP8 without Transformer Engine on a CUDA device is refused up front, never trained as bf16.
    with pytest.raises(PrecisionError, match=r"model\.precision\.fp8"):
        check_precision(model, "cpu")

    # docs/scale-out.md tells every node to export exactly what set_deterministic sets on a GPU.
    doc = (REPO / "docs" / "scale-out.md").read_text()
    exported = dict(re.findall(r"(\w+)=(\S+)", doc.split("export CUBLAS_WORKSPACE_CONFIG", 1)[1].splitlines()[0]))
    exported["CUBLAS_WORKSPACE_CONFIG"] = doc.split("export CUBLAS_WORKSPACE_CONFIG=", 1)[1].split()[0]
    assert exported == dict(GPU_DETERMINISM_ENV)
    assert "--config-name pretrain_multinode" in doc
