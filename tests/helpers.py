"""Helpers shared by test modules (import them: ``from helpers import checked, make_project``).

Fixtures live in ``conftest.py``; plain functions, classes and constants live here, so a test module imports
what it uses by name instead of importing ``conftest``. ``tests/`` is on ``sys.path`` (pyproject's
``[tool.pytest.ini_options] pythonpath``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from filelock import FileLock

from flowpin.hashing import Hasher
from flowpin.manifest.record import record
from flowpin.manifest.verify import VerifyReport, verify_manifest
from flowpin.signing import Signer, load_trust_store

# --- signed-manifest projects (tests/manifest/test_statement_errors.py, test_cli.py, test_interop.py) -------


@dataclasses.dataclass
class Project:
    """A throw-away flowpin project: a root with ``.dvc/``, a signing key and its trusted public key."""

    root: Path
    signer: Signer
    """Its public key is in ``root/keys/``."""

    def manifest_path(self, stage: str) -> Path:
        return self.root / "manifests" / f"{stage}.json"

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        return load_trust_store(self.root)

    def write_outputs(self, stage: str) -> tuple[str, str]:
        """Write one file output and one directory output of ``stage``; returns their artifact names."""
        base = self.root / "artifacts" / stage
        (base / "shards" / "sub").mkdir(parents=True, exist_ok=True)
        (base / "model.bin").write_bytes(b"weights of " + stage.encode() + b"\n")
        (base / "shards" / "a.txt").write_text("alpha\n")
        (base / "shards" / "sub" / "b.txt").write_text("beta\n")
        return f"artifacts/{stage}/model.bin", f"artifacts/{stage}/shards"

    def record_stage(
        self,
        stage: str = "train",
        *,
        recipe: dict[str, Any] | None = None,
        inputs: Sequence[str] = (),
        parents: Sequence[str] = (),
        manifest: str | None = None,
        algorithm: str | None = None,
    ) -> Path:
        """Record ``stage`` (file + directory output) and return the manifest path it wrote."""
        file_out, dir_out = self.write_outputs(stage)
        with record(
            stage,
            recipe=recipe if recipe is not None else {"lr": 0.1, "model": {"layers": 2}},
            code=[],
            root=self.root,
            manifest=manifest,
            signer=self.signer,
            algorithm=algorithm,
        ) as rec:
            for name in inputs:
                rec.input(name)
            for parent in parents:
                rec.parent(parent)
            rec.output(file_out)
            rec.output(dir_out)
        return self.root / manifest if manifest is not None else self.manifest_path(stage)

    def verify(self, path: Path) -> VerifyReport:
        """``verify_manifest`` against this project's trust store (no stat cache)."""
        return verify_manifest(path, root=self.root, trusted=self.trusted(), hasher=Hasher(self.root, workers=1))


# --- unreadable files ----------------------------------------------------------------------------


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading ``path`` fail with EACCES. Tests run as root, which reads mode-000 files anyway, so
    as root ``os.open`` is made to fail for this one path instead of changing its mode."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = os.open

    def guarded_open(target: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(target) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        return real_open(target, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)


# --- scratch DVC projects (end-to-end tests of the real stage scripts) ----------------------------

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
_PROJECT_FILES = ("dvc.yaml", "params", "stages", "src", "keys", ".dvcignore", ".gitignore")


def scratch_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", FLOWPIN_ROOT=str(root))
    env.pop("FLOWPIN_SIGNING_KEY", None)
    return env


def run_in(root: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a command in a scratch project (venv tools on PATH); never raises on failure."""
    return subprocess.run(list(cmd), cwd=root, env=scratch_env(root), capture_output=True, text=True, check=False)


def checked(root: Path, *cmd: str) -> str:
    proc = run_in(root, *cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def make_project(dest: Path) -> Path:
    """A scratch flowpin project: the flow's files, a fresh git repo, DVC initialised, a new key."""
    dest.mkdir(parents=True)
    for name in _PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@flowpin.invalid"],
        ["git", "config", "user.name", "flowpin test"],
        [str(BIN / "dvc"), "init", "-q"],
        [str(BIN / "dvc"), "config", "core.analytics", "false"],
        [str(BIN / "flowpin"), "key", "init"],
    ):
        checked(dest, *cmd)
    return dest


# --- tiny flows built once per test session (conftest.py's session fixtures) -------------------------

DATA_STAGES = (
    "ingest",
    "dedup",
    "synth",
    "decontaminate",
    "mix",
    "tokenize",
    "mix_midtrain",
    "tokenize_midtrain",
    "mix_longctx",
    "tokenize_longctx",
)
"""Every stage of the data flow; each writes manifests/<stage>.json (conftest.py's ``data_flow`` runs them)."""

POST_UPSTREAM = {  # synth -> tokenize (of the synth tasks) -> a 4-step pretrain: the init of short post-training runs
    "stages/synth.py": (
        "synth.arithmetic.train=120",
        "synth.arithmetic.heldout=8",
        "synth.word_problem.train=60",
        "synth.word_problem.heldout=4",
    ),
    "stages/tokenize_corpus.py": (
        "paths.inputs.corpus.data=data/synth/train",
        "paths.inputs.corpus.manifest=manifests/synth.json",
        "tokenize.tokenizer.vocab_size=1024",
        "tokenize.packing.seq_len=64",
    ),
    "stages/train.py": (
        "model.max_sequence_length=64",
        "model.sliding_window=32",
        "train.loop.steps=4",
        "train.loop.batch_size=4",
        "train.loop.checkpoint_every=4",
        "train.loop.optim.schedule.warmup_steps=1",
    ),
}
"""Stage script -> overrides, run in this order by conftest.py's ``post_flow`` (tests/post/test_dpo.py, rlvr)."""

SHARED_BUILD_TIMEOUT = 1800.0
"""Seconds a process waits for another one's build of a shared flow before it gives up."""


def copy_project(src: Path, dest: Path) -> Path:
    """A private copy of a scratch project (git, DVC, key, outputs, manifests): what a test may change."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def shared_project(base: Path, name: str, build: Callable[[Path], object]) -> Path:
    """The project ``base/<name>/p``, made by ``build(project)`` once for every process that shares ``base``.

    The first process to take ``base/<name>.lock`` builds; the others (pytest-xdist workers) wait for the lock,
    then reuse what it built. Each attempt builds in a directory of its own, renamed to ``p`` once complete, and
    ``base/<name>/done`` is written last, atomically (a rename): a build that failed or was killed half-way leaves
    no marker, and the next process to take the lock builds again, beside anything the dead one's stage
    processes may still be writing. The project is read-only for its users: :func:`copy_project` it before
    changing or running anything there.
    """
    home = base / name
    project, done = home / "p", home / "done"
    with FileLock(base / f"{name}.lock", timeout=SHARED_BUILD_TIMEOUT):
        if not done.is_file():
            home.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(project, ignore_errors=True)  # renamed into place, but its marker not written
            attempt = Path(tempfile.mkdtemp(prefix="build-", dir=home))
            t0 = time.monotonic()
            build(attempt / "p")
            os.rename(attempt / "p", project)
            partial = home / "done.partial"
            partial.write_text(f"{name}: built in {time.monotonic() - t0:.1f} s by process {os.getpid()}\n")
            os.replace(partial, done)
            attempt.rmdir()
    return project


def extend_project(parent: Path, *commands: Sequence[str]) -> Callable[[Path], None]:
    """A build for :func:`shared_project`: a copy of ``parent``, then each command run in it (it must succeed)."""

    def build(root: Path) -> None:
        copy_project(parent, root)
        for cmd in commands:
            checked(root, *cmd)

    return build


# --- a minimal real checkpoint state (tests/test_hostile_input.py, test_no_pickle.py) ---------------


def one_step_state(model: Any, optimizer: Any, x: Any) -> Any:
    """Take one optimizer step of ``model`` on ``x`` (so AdamW has state); the TrainState to save after it."""
    from flowpin.train.checkpoint import DataPosition, TrainState, capture_rng

    model(x).sum().backward()
    optimizer.step()
    return TrainState(
        step=1,
        tokens_seen=8,
        data=DataPosition(dataset_digest="d" * 64, order_seed=1, batch_size=2, next_step=1),
        lr=1e-3,
        config={},
        rng=capture_rng(),
        metrics={},
        determinism={},
    )


# --- fault injection report (tests/test_faults.py, `make faults`) ---------------------------------

FAULTS: dict[str, int] = {"injected": 0, "lost": 0}
"""Updated by tests/test_faults.py: faults really injected (a process dead by SIGKILL, a write refused by a
full disk or a file size limit) and committed artifacts found changed or missing afterwards."""


# --- the flowpin CLI's commands (tests/test_cli.py, test_readme.py) ---------------------------------


def flowpin_commands() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command of ``flowpin`` (``()`` is ``flowpin`` itself, ``("key", "init")`` is ``flowpin key init``)
    and its parser, walked from the parser ``flowpin`` runs (:func:`flowpin.cli.build_parser`)."""
    from flowpin.cli import build_parser

    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk((*path, name), sub)

    walk((), build_parser())
    return found


# --- a probe stage for sweeps (tests/test_sweep.py, test_readme.py) ------------------------------------

PROBE_RECIPE = """\
defaults:
  - common/hydra
  - _self_

paths:
  out: out/probe
  report: reports/probe.json
  manifest: manifests/probe.json

probe:
  lr: 0.1
  width: 4
  fail: false
"""

PROBE_STAGE = '''\
"""A stage that trains nothing: one file depends on probe.lr, one does not; a report with a final loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probe:
    lr: float
    width: int
    fail: bool = False


@hydra.main(config_path="../params", config_name="probe", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("probe", cfg, Probe, root=ROOT) as run:
        if run.recipe.fail:
            raise RuntimeError("probe asked to fail")
        (run.out_dir / "weights.txt").write_text(f"{run.recipe.lr * run.recipe.width}\\n")
        (run.out_dir / "shape.txt").write_text(f"width {run.recipe.width}\\n")
        run.report = {"loss": {"last": 1.0 / run.recipe.lr}, "steps": run.recipe.width}


if __name__ == "__main__":
    main()
'''
