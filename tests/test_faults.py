"""Fault injection (docs/hardening.md, "Faults"): a real SIGKILL at every write point, then a rerun.

Every fault is real: a process kills itself with SIGKILL at a named failpoint (``FLOWPIN_FAILPOINT``,
:mod:`flowpin.failpoints`), a ``dvc`` process kills itself inside its cache commit, a training run is
killed from outside at seeded times, and a full disk is a real small tmpfs or a real file size limit
(``RLIMIT_FSIZE``: the kernel answers EFBIG). After each fault:

* every manifest present either verifies -- and then every dataset it pins reads back complete -- or
  fails verification: nothing incomplete passes;
* nothing committed earlier changed (sha256 of every file: other stages' data and manifests, ``keys/``,
  the DVC cache and ``dvc.lock``); the killed stage's output is the complete old tree or the complete
  new one; leftovers are hidden ``*.tmp`` temporaries only;
* the rerun completes, and a training run ends on the checkpoint bytes of an uninterrupted run.

The counts go to the pytest summary line ``faults injected: N, artifacts lost: 0`` (``make faults``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from flowpin.data.shards import read_dataset, read_index
from flowpin.errors import FailpointError
from flowpin.failpoints import NAMES, Failpoint, failpoint, parse
from flowpin.hashing import Hasher
from flowpin.manifest.statement import load_manifest
from flowpin.manifest.verify import find_manifests, verify_manifest
from flowpin.signing import load_signer, load_trust_store
from helpers import BIN, FAULTS, checked, make_project, scratch_env

DVC = str(BIN / "dvc")
FLOWPIN = str(BIN / "flowpin")
SMALL = [  # a synth run that differs from the committed one and cuts each split into 5 shards
    "synth.seed=7",
    "synth.arithmetic.train=300",
    "synth.word_problem.train=200",
    "synth.shards.docs_per_shard=100",
]
OTHER = ["paths.out=data/other", "paths.report=reports/other.json", "paths.manifest=manifests/other.json"]
OWN = ("data/synth", "reports/synth.json", "manifests/synth.json")
"""What a synth run rewrites: its previous manifest is removed on entry by design, its output is swapped."""
COMMITTED = ("data", "manifests", "reports", "keys", ".flowpin/keys", ".dvc/cache", "dvc.lock", "params", "src")
HIDDEN_TEMP = re.compile(r"\..+\.(tmp|old-\d+)")


# --- bookkeeping ----------------------------------------------------------------------------------


def injected(
    proc: subprocess.CompletedProcess[str] | subprocess.CompletedProcess[bytes] | subprocess.Popen[bytes],
) -> None:
    """Count a fault only when the process really died by SIGKILL."""
    assert proc.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got {proc.returncode}"
    FAULTS["injected"] += 1


def lost(names: Sequence[str], what: str) -> None:
    """Record committed artifacts changed or missing (``names``), then fail if there are any."""
    FAULTS["lost"] += len(names)
    assert not names, f"{what}: {names}"


def files(root: Path, names: Sequence[str] = COMMITTED, *, skip: Sequence[str] = ()) -> dict[str, str]:
    """relative path -> sha256 of every regular file under ``names`` (hidden temporaries excluded)."""
    out: dict[str, str] = {}
    for name in names:
        base = root / name
        for path in [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            if any(rel == s or rel.startswith(s + "/") for s in skip) or HIDDEN_TEMP.fullmatch(path.name):
                continue
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changed(before: Mapping[str, object], after: Mapping[str, object]) -> list[str]:
    return [name for name, digest in before.items() if after.get(name) != digest]


VISIBLE = ("data", "manifests", "reports", "keys")


def entries(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for name in VISIBLE for p in (root / name).rglob("*")}


def leftovers(root: Path, before: set[str]) -> list[str]:
    """Entries of the artifact directories that appeared since ``before`` and are not hidden temporaries."""
    return sorted(n for n in entries(root) - before if not any(HIDDEN_TEMP.fullmatch(part) for part in Path(n).parts))


def check_manifests(root: Path) -> dict[str, bool]:
    """Verify every manifest; for each that passes, read every dataset it pins back in full."""
    trusted, result = load_trust_store(root), {}
    for path in find_manifests(root):
        report = verify_manifest(path, root=root, trusted=trusted, hasher=Hasher(root, workers=1))
        result[path.relative_to(root).as_posix()] = report.ok
        if report.ok:
            for subject in load_manifest(path).subjects:
                target = root / subject["name"]
                assert target.exists(), f"{path} verified but {target} is missing"
                for index in sorted(target.rglob("index.json")) if target.is_dir() else []:
                    expected = sum(s["records"] for s in read_index(index.parent)["shards"])
                    assert sum(1 for _ in read_dataset(index.parent)) == expected, f"{index.parent} is incomplete"
                    listed = {s["name"] for s in read_index(index.parent)["shards"]}
                    on_disk = {p.name for p in index.parent.glob("shard-*")}
                    assert on_disk == listed, f"{index.parent}: shards on disk {on_disk} != index {listed}"
    return result


def run(
    root: Path, *cmd: str, failpoint_spec: str | None = None, preexec: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**scratch_env(root), "FLOWPIN_TRACKING": "off"}
    env.pop("FLOWPIN_FAILPOINT", None)
    if failpoint_spec is not None:
        env["FLOWPIN_FAILPOINT"] = failpoint_spec
    return subprocess.run(
        list(cmd), cwd=root, env=env, capture_output=True, text=True, check=False, preexec_fn=preexec, timeout=300
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def file_limit(limit: int) -> Callable[[], None]:
    """A child-process hook: a real file size limit; SIGXFSZ ignored so that writes fail with EFBIG."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# --- failpoints themselves --------------------------------------------------------------------------


def test_failpoint_spec_parsing_and_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse("atomic.before-rename:manifests/@2") == Failpoint(
        name="atomic.before-rename", match="manifests/", nth=2
    )
    assert parse("key.after-private") == Failpoint(name="key.after-private")
    for bad, why in (("atomic.nope", "unknown failpoint"), ("atomic.partial@0", "counts hits from 1"), ("!", "NAME")):
        with pytest.raises(FailpointError, match=why):
            parse(bad)
    monkeypatch.setenv("FLOWPIN_FAILPOINT", "atomic.partial@x")  # a typo fails loudly, never a silent clean run
    with pytest.raises(FailpointError, match="FLOWPIN_FAILPOINT"):
        failpoint("atomic.partial", "x")
    monkeypatch.setenv("FLOWPIN_FAILPOINT", "atomic.partial:elsewhere")
    failpoint("atomic.partial", "here")  # armed, but the detail does not match: no kill
    src = "\n".join(p.read_text() for p in (Path(__file__).parents[1] / "src" / "flowpin").rglob("*.py"))
    placed = set(re.findall(r'failpoint\("([a-z.-]+)"', src))
    assert placed == NAMES, "the catalogue (flowpin.failpoints.NAMES) and the failpoints in the code differ"


# --- a data stage killed at every write point -------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with `synth` reproduced and committed by DVC, plus a second signed dataset (`other`)."""
    root = make_project(tmp_path_factory.mktemp("faults") / "base")
    checked(root, DVC, "repro", "synth")
    ok(run(root, sys.executable, "stages/synth.py", *SMALL, *OTHER))
    assert check_manifests(root) == {"manifests/other.json": True, "manifests/synth.json": True}
    return root


def copy_of(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, symlinks=True)
    return dest


DATA_FAULTS = [  # (failpoint, data/synth after the kill, whether the kill leaves a hidden temporary)
    ("shards.before-shard:shard-00002@1", "old", True),  # two shards of a split published in the temp tree
    ("atomic.before-fsync:shard-00001@2", "old", True),  # a shard's bytes in its temporary, not fsynced
    ("atomic.before-rename:shard-00004@1", "old", True),
    ("atomic.partial:index.json@1", "old", True),  # half an index.json in its temporary
    ("atomic.after-rename:index.json@2", "old", True),  # both splits complete, the tree not swapped in
    ("atomic.dir-before-swap:data/synth@1", "old", True),
    ("atomic.dir-after-swap:data/synth@1", "new", True),  # new tree in place, the old one not yet removed
    ("atomic.partial:reports/synth.json@1", "new", True),
    ("manifest.before-write:manifests/synth.json@1", "new", False),
    ("atomic.partial:manifests/synth.json@1", "new", True),  # half a signed manifest in its temporary
    ("atomic.before-rename:manifests/synth.json@1", "new", True),
    ("atomic.after-rename:manifests/synth.json@1", "new", False),  # published, its directory not fsynced
]


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "tree", "temp"), DATA_FAULTS, ids=[f[0] for f in DATA_FAULTS])
def test_data_stage_killed_at_a_write_point_then_rerun(
    base: Path, tmp_path: Path, spec: str, tree: str, temp: bool
) -> None:
    root = copy_of(base, tmp_path / "p")
    committed = files(root, skip=OWN)
    old = files(root, ["data/synth"])
    before = entries(root)

    injected(run(root, sys.executable, "stages/synth.py", *SMALL, failpoint_spec=spec))
    verdicts = check_manifests(root)  # raises if a manifest verifies while a dataset it pins is incomplete
    assert verdicts["manifests/other.json"]
    assert ("manifests/synth.json" in verdicts) == spec.startswith("atomic.after-rename:manifests")
    after_kill = files(root, ["data/synth"])
    lost(changed(committed, files(root, skip=OWN)), "a committed artifact changed after the kill")
    assert not [n for n in leftovers(root, before) if not n.startswith(OWN)], "a non-hidden leftover"
    temps = [n for n in entries(root) - before if any(HIDDEN_TEMP.fullmatch(part) for part in Path(n).parts)]
    assert bool(temps) == temp, f"the kill did not hit where {spec} says: hidden temporaries {temps}"

    ok(run(root, sys.executable, "stages/synth.py", *SMALL))
    assert all(check_manifests(root).values())
    new = files(root, ["data/synth"])
    assert new != old
    lost([] if after_kill in (old, new) else ["data/synth"], f"{spec}: data/synth was neither the old nor the new tree")
    assert after_kill == {"old": old, "new": new}[tree], f"{spec}: data/synth is not the {tree} tree"
    lost(changed(committed, files(root, skip=OWN)), "a committed artifact changed after the rerun")


# --- key creation -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_key_init_killed_before_trusting_its_public_key_is_repaired(base: Path, tmp_path: Path) -> None:
    root = copy_of(base, tmp_path / "p")
    key = root / ".flowpin" / "keys" / "signing.key"
    key.unlink()  # a fresh clone: the trust store is committed, the private key is not
    committed = files(root)

    injected(run(root, FLOWPIN, "key", "init", failpoint_spec="key.after-private"))
    signer = load_signer(root, key)  # the private key is complete (0600, loads)...
    assert signer.keyid not in load_trust_store(root)  # ...but untrusted: its manifests would never verify
    lost(changed(committed, files(root)), "a committed artifact changed after the kill")

    out = ok(run(root, FLOWPIN, "key", "init", "--if-missing"))
    assert f"trusted its public key keys/{signer.keyid}.pub" in out
    assert signer.keyid in load_trust_store(root) and load_signer(root, key).keyid == signer.keyid
    assert "trusted its public key" not in ok(run(root, FLOWPIN, "key", "init", "--if-missing"))  # idempotent
    ok(run(root, sys.executable, "stages/synth.py", *SMALL))
    assert check_manifests(root)["manifests/synth.json"]


# --- DVC commit ---------------------------------------------------------------------------------------

KILLING_DVC = textwrap.dedent(
    """
    import os, signal, sys

    where = os.environ.pop("FAULT_DVC")
    if where == "cache-copy":  # the 3rd object copied into .dvc/cache: half its bytes, then SIGKILL
        import dvc_objects.fs.local as local

        real, calls = local.copyfile, [0]

        def copyfile(src, dst, *args, **kwargs):
            calls[0] += isinstance(src, (str, os.PathLike))
            if calls[0] == 3 and isinstance(src, (str, os.PathLike)):
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    data = fin.read()
                    fout.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)

        local.copyfile = copyfile
    elif where == "lock-dump":  # outputs committed to the cache, dvc.lock not yet written
        import dvc.dvcfile

        def dump_stages(self, stages, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        dvc.dvcfile.Lockfile.dump_stages = dump_stages
    else:
        raise SystemExit(f"unknown FAULT_DVC {where!r}")
    from dvc.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def cache_corruption(root: Path) -> list[str]:
    """Objects in ``.dvc/cache`` whose bytes do not hash to their name (hidden ``*.tmp`` partials are skipped)."""
    bad = []
    for path in sorted((root / ".dvc" / "cache" / "files" / "md5").glob("*/*")):
        if HIDDEN_TEMP.fullmatch(path.name):
            continue
        md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        if path.parent.name + path.name.removesuffix(".dir") != md5:
            bad.append(str(path))
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("where", ["cache-copy", "lock-dump"])
def test_dvc_killed_while_committing_outputs_then_rerun(base: Path, tmp_path: Path, where: str) -> None:
    root = copy_of(base, tmp_path / "p")
    pipeline = root / "dvc.yaml"  # a changed command: DVC reruns synth and commits new outputs
    text = pipeline.read_text()
    assert text.count("cmd: python stages/synth.py\n") == 1
    pipeline.write_text(
        text.replace("cmd: python stages/synth.py\n", f"cmd: python stages/synth.py {' '.join(SMALL)}\n")
    )
    committed = files(root, skip=OWN)

    env_cmd = [sys.executable, "-c", KILLING_DVC, "repro", "synth"]
    env = {**scratch_env(root), "FLOWPIN_TRACKING": "off", "FAULT_DVC": where}
    proc = subprocess.run(env_cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    injected(proc)
    if where == "cache-copy":  # the kill really hit mid-copy: a partial object sits under a temporary name
        assert [p for p in (root / ".dvc" / "cache").rglob("*") if HIDDEN_TEMP.fullmatch(p.name)]
    assert cache_corruption(root) == []
    lost(changed(committed, files(root, skip=OWN)), "the cache, dvc.lock or another artifact changed")
    check_manifests(root)

    ok(run(root, DVC, "repro", "synth"))
    assert "Data and pipelines are up to date" in ok(run(root, DVC, "status", "synth"))
    assert all(check_manifests(root).values())
    assert cache_corruption(root) == []
    del committed["dvc.lock"]  # the rerun records the new outputs there
    lost(changed(committed, files(root, skip=OWN)), "a committed artifact changed after the rerun")


# --- disk full: a real small tmpfs, and a real file size limit ----------------------------------------


def assert_clean_refusal(proc: subprocess.CompletedProcess[str], limit_words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "flowpin: WriteError: could not write" in proc.stderr, proc.stderr
    assert limit_words in proc.stderr and "free space" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    FAULTS["injected"] += 1


@pytest.mark.slow
def test_data_stage_under_a_file_size_limit_fails_cleanly(base: Path, tmp_path: Path) -> None:
    root = copy_of(base, tmp_path / "p")
    committed, old = files(root, skip=OWN), files(root, ["data/synth"])
    before = entries(root)
    argv = [
        sys.executable,
        "stages/synth.py",
        *SMALL[:1],
        "synth.arithmetic.train=6000",
        "synth.word_problem.train=600",
        "synth.shards.docs_per_shard=8192",  # one train shard of ~450 KiB
    ]
    # 16 KiB: SQLite's 32 KiB WAL index of the digest stat cache is the first file to hit the limit;
    # 256 KiB: the cache and its write-ahead log (over 128 KiB with the stage's ~70 code files) fit, the shard does not.
    for limit_kib, path in ((16, ".flowpin/cache/digests.sqlite"), (256, "train/shard-00000.jsonl.zst")):
        proc = run(root, *argv, preexec=file_limit(limit_kib * 1024))
        assert_clean_refusal(proc, "file size limit")
        assert path in proc.stderr, proc.stderr  # names the file it could not write
        assert files(root, ["data/synth"]) == old  # the old artifact is intact
        assert leftovers(root, before) == [] and not list((root / "data").glob(".synth.*"))  # no half artifact
        lost(changed(committed, files(root, skip=OWN)), "a committed artifact changed")

    ok(run(root, *argv))
    assert all(check_manifests(root).values())


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int) -> Iterator[str | None]:
    """Mount a tmpfs of ``size_kib`` at ``path``; yields None when mounted, else why it could not be."""
    if shutil.which("mount") is None:
        yield "no mount(8) on this machine"
        return
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        yield f"mount -t tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode})"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_data_stage_on_a_full_tmpfs_fails_cleanly(base: Path, tmp_path: Path) -> None:
    root = copy_of(base, tmp_path / "p")
    data, aside = root / "data", tmp_path / "data-aside"
    shutil.move(data, aside)
    data.mkdir()
    used_kib = sum(-(-p.stat().st_size // 4096) * 4 for p in aside.rglob("*") if p.is_file())
    with tmpfs(data, used_kib + 48) as why_not:  # the committed data fits; a new ~150 KB synth tree does not
        if why_not is not None:  # the file size limit test above covers the same path anywhere
            pytest.skip(f"{why_not}; test_data_stage_under_a_file_size_limit_fails_cleanly covers disk full")
        shutil.copytree(aside, data, dirs_exist_ok=True, symlinks=True)
        committed, old = files(root, skip=OWN), files(root, ["data/synth"])
        before = entries(root)

        proc = run(root, sys.executable, "stages/synth.py", *SMALL)
        assert_clean_refusal(proc, "disk is full")
        assert "No space left on device" in proc.stderr
        assert files(root, ["data/synth"]) == old
        assert leftovers(root, before) == [] and not list(data.glob(".synth.*"))
        lost(changed(committed, files(root, skip=OWN)), "a committed artifact changed")
        assert check_manifests(root)["manifests/other.json"]


# --- training: named checkpoint failpoints, a file size limit, and kills at random times -------------

TRAIN = textwrap.dedent(
    '''
    """A tiny LM trained by flowpin's loop, checkpointing every 10 of 40 steps; argv: RUN_DIR."""
    import dataclasses
    import hashlib
    import sys
    from pathlib import Path

    import torch
    from torch import nn

    from flowpin.data.order import DataOrder
    from flowpin.train.loop import OptimConfig, TrainConfig, seed_all, train
    from flowpin.train.schedule import ScheduleConfig

    V, D, T, B = 32, 16, 12, 4

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.norm = nn.LayerNorm(D)
            self.drop = nn.Dropout(0.1)
            self.mix = nn.Linear(D, D)
            self.head = nn.Linear(D, V, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.drop(self.mix(self.norm(self.embed(x)))))

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))

    ORDER = DataOrder(n_sequences=50, dataset_digest=hashlib.sha256(b"faults").hexdigest(), order_seed=3, batch_size=B)

    @dataclasses.dataclass(frozen=True)
    class Counting:
        """Sequence i counts up mod V from a start drawn from i: a pure function of the step."""

        order: DataOrder

        def __call__(self, step: int) -> torch.Tensor:
            rows = []
            for i in self.order.batch(step):
                start = torch.randint(0, V, (1,), generator=torch.Generator().manual_seed(i))
                rows.append((start + torch.arange(T)) % V)
            return torch.stack(rows)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        schedule = ScheduleConfig(total_steps=40, warmup_steps=4, peak_lr=2e-2, min_lr=2e-3)
        cfg = TrainConfig(steps=40, batch_size=B, seed=11, checkpoint_every=10, log_every=10,
                          optim=OptimConfig(schedule=schedule))
        seed_all(0)
        train(model=TinyLM(), loss_fn=loss_fn, data=Counting(ORDER), cfg=cfg, run_dir=Path(sys.argv[1]))
    '''
)
STEPS = (10, 20, 30, 40)


@dataclasses.dataclass(frozen=True)
class Trainer:
    script: Path
    reference: dict[str, dict[str, str]]
    """Checkpoint name -> file digests of an uninterrupted run."""
    seconds: float
    """Wall time of the uninterrupted run (imports included)."""


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    base = tmp_path_factory.mktemp("train")
    script = base / "tiny_lm.py"
    script.write_text(TRAIN)
    t0 = time.monotonic()
    ok(run(base, sys.executable, str(script), str(base / "reference")))
    reference = checkpoints(base / "reference")
    assert sorted(reference) == [f"step-{s:06d}" for s in STEPS]
    return Trainer(script=script, reference=reference, seconds=time.monotonic() - t0)


def checkpoints(run_dir: Path) -> dict[str, dict[str, str]]:
    """Complete (published) checkpoints: name -> their files' sha256."""
    found = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    return {p.name: files(p, ["."]) for p in found}


def assert_only_complete_checkpoints(run_dir: Path, reference: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Every published checkpoint equals the uninterrupted run's at that step; the rest are hidden temps."""
    present = checkpoints(run_dir)
    for name, digests in present.items():
        assert digests == reference[name], f"{run_dir}/checkpoints/{name} is published but incomplete or different"
    for child in (run_dir / "checkpoints").iterdir() if (run_dir / "checkpoints").is_dir() else []:
        assert child.name in present or HIDDEN_TEMP.fullmatch(child.name), f"unexpected {child}"
    return present


TRAIN_FAULTS = [  # (failpoint, checkpoints complete after the kill); each run resumes from the previous one
    ("checkpoint.before-file:optimizer.safetensors@1", []),  # step 10: model.safetensors written, the rest not
    ("checkpoint.before-state@2", [10]),  # step 20: tensor files written, state.json not
    ("atomic.dir-before-swap:step-000020@1", [10]),  # step 20 complete in its temporary, not published
    ("atomic.before-rename:state.json@2", [10, 20]),  # step 30: state.json fsynced, not renamed
    ("atomic.dir-after-swap:step-000030@1", [10, 20, 30]),  # step 30 published, directory not fsynced
]


@pytest.mark.slow
def test_training_killed_at_every_checkpoint_write_point_and_at_a_file_size_limit_resumes_bitwise(
    trainer: Trainer, tmp_path: Path
) -> None:
    script, reference = trainer.script, trainer.reference
    run_dir = tmp_path / "run"
    argv = [sys.executable, str(script), str(run_dir)]
    for spec, complete in TRAIN_FAULTS:
        before = checkpoints(run_dir)
        injected(run(tmp_path, *argv, failpoint_spec=spec))
        present = assert_only_complete_checkpoints(run_dir, reference)
        assert sorted(present) == [f"step-{s:06d}" for s in complete], spec
        lost(changed(before, present), f"{spec}: an earlier checkpoint changed")

    # A file size limit below one model.safetensors: the save of step 40 is refused, nothing is published.
    before = checkpoints(run_dir)
    proc = run(tmp_path, *argv, preexec=file_limit(2048))
    assert proc.returncode == 1 and "WriteError" in proc.stderr and "file size limit" in proc.stderr, proc.stderr
    assert "model.safetensors" in proc.stderr
    FAULTS["injected"] += 1
    assert checkpoints(run_dir) == before
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".step-000040")]

    ok(run(tmp_path, *argv))
    assert checkpoints(run_dir) == reference  # resumed, and ends on the uninterrupted run's bytes


@pytest.mark.slow
def test_training_killed_from_outside_at_seeded_random_times_resumes_bitwise(trainer: Trainer, tmp_path: Path) -> None:
    """Plain SIGKILL from another process, at times nobody chose a failpoint for (seeded fractions of the
    uninterrupted run's wall time, so the kills land in imports, steps and saves alike)."""
    script, reference = trainer.script, trainer.reference
    run_dir, rng = tmp_path / "run", random.Random(20251123)
    env = {**scratch_env(tmp_path), "FLOWPIN_TRACKING": "off"}
    kills = 0
    for _ in range(3):
        before = checkpoints(run_dir)
        proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], cwd=tmp_path, env=env)
        t0, delay = time.monotonic(), rng.uniform(0.4, 0.8) * trainer.seconds
        while proc.poll() is None and time.monotonic() - t0 < delay:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            injected(proc)
            kills += 1
        assert_only_complete_checkpoints(run_dir, reference)
        lost(changed(before, checkpoints(run_dir)), "an earlier checkpoint changed")
    assert kills >= 1, "every run finished before its kill time: no fault was injected"
    ok(run(tmp_path, sys.executable, str(script), str(run_dir)))
    assert checkpoints(run_dir) == reference
