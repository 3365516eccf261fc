"""Tests for flowpin.environment: identity fingerprint, git dirty state, TE probe, numerics diff."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.abc
import importlib.machinery
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from flowpin.canonical import canonical_json
from flowpin.environment import (
    EnvDifference,
    _cpu,
    fingerprint,
    git_state,
    numerics_differences,
    probe_transformer_engine,
    run_context,
)


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "checkout-a" / "repo"
    (root / "src").mkdir(parents=True)
    git(root, "init", "-q")
    (root / "src" / "model.py").write_text("LR = 0.1\n")
    (root / "README.md").write_text("hello\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    (root / ".gitignore").write_text("*.log\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    return root


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# --- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_is_canonical_and_stable(repo: Path) -> None:
    first = fingerprint(repo)
    second = fingerprint(repo)
    assert canonical_json(first) == canonical_json(second)
    assert set(first) >= {"python", "os", "cpu", "packages", "transformerEngine", "envVars", "git"}
    assert first["git"]["commit"] == git(repo, "rev-parse", "HEAD")
    assert first["packages"]["numpy"] == metadata.version("numpy")
    assert first["packages"]["transformer-engine"] is None or isinstance(first["packages"]["transformer-engine"], str)


def test_fingerprint_holds_no_host_or_location(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(repo / "cache"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "~/torch_ext")
    monkeypatch.chdir(repo)
    host = socket.gethostname()
    for text in strings(fingerprint(repo)):
        assert not text.startswith(("/", "~")), text
        assert text != host
        assert str(repo) not in text


def test_torch_section_reads_live_settings() -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert fingerprint(Path.cwd())["torch"]["numThreads"] == 1
    finally:
        torch.set_num_threads(before)


def test_cpu_flags_are_filtered_and_the_digest_covers_only_the_simd_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags_line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), None)
    if flags_line is None:
        pytest.skip("no x86 flags line")
    all_flags = sorted(set(flags_line.partition(":")[2].split()))
    cpu = fingerprint(Path.cwd())["cpu"]
    assert cpu["flagsDigest"] == hashlib.sha256(" ".join(cpu["flags"]).encode()).hexdigest()
    assert cpu["flags"] == sorted(cpu["flags"])
    assert set(cpu["flags"]) <= set(all_flags)
    assert {"sse4_2", "avx2", "fma"} & set(all_flags) <= set(cpu["flags"])
    assert not {"fpu", "vme", "hypervisor", "constant_tsc"} & set(cpu["flags"])


def test_machines_with_the_same_simd_flags_get_the_same_flags_digest() -> None:
    """Issue #14: two machines with the same recorded SIMD flags got different digests (and a "can change
    numerics" mark in flowpin diff) because the digest covered every /proc/cpuinfo flag."""
    simd = "sse4_2 avx avx2 fma f16c"
    a = _cpu(f"model name : X\nflags : fpu vme {simd} hypervisor\n")
    b = _cpu(f"model name : X\nflags : {simd} constant_tsc arch_perfmon\n")
    assert a["flags"] == b["flags"] and a["flagsDigest"] == b["flagsDigest"]
    assert numerics_differences({"cpu": a}, {"cpu": b}) == []
    c = _cpu(f"model name : X\nflags : {simd} avx512f\n")
    assert c["flagsDigest"] != a["flagsDigest"]


def test_env_vars_keep_numerics_knobs_and_skip_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    prefixes: tuple[str, ...] = ("OMP_", "MKL_", "OPENBLAS_", "NUMEXPR_", "CUBLAS_", "CUDA_", "NCCL_", "NVTE_")
    prefixes = (*prefixes, "TORCH_", "ATEN_", "ONEDNN_", "DNNL_")
    for name in list(os.environ):
        if name.startswith((*prefixes, "FLOWPIN_", "TOKENIZERS_", "PYTHONHASHSEED")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    monkeypatch.setenv("NVTE_FUSED_ATTN", "1")
    monkeypatch.setenv("FLOWPIN_STRICT", "1")
    monkeypatch.setenv("TORCH_HOME", "/var/cache/torch")  # absolute path: skipped
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "build:/opt/ext")  # path list with an absolute entry
    monkeypatch.setenv("FLOWPIN_SIGNING_KEY", "keys/dev.pem")  # relative, but excluded by name
    monkeypatch.setenv("FLOWPIN_ROOT", ".")
    monkeypatch.setenv("UNRELATED_VAR", "1")
    assert fingerprint(Path.cwd())["envVars"] == {
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "FLOWPIN_STRICT": "1",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        "NVTE_FUSED_ATTN": "1",
        "OMP_NUM_THREADS": "4",
    }


def test_run_context_describes_this_process() -> None:
    ctx = run_context()
    assert ctx["hostname"] == socket.gethostname()
    assert ctx["pid"] == os.getpid()
    assert ctx["executable"] == sys.executable
    assert ctx["cwd"] == str(Path.cwd())


# --- git state -------------------------------------------------------------------------------------


def test_clean_repo_is_not_dirty(repo: Path) -> None:
    state = git_state(repo)
    assert state == {
        "commit": git(repo, "rev-parse", "HEAD"),
        "dirty": False,
        "dirtyDigest": None,
        "dirtyPaths": 0,
    }


def test_tracked_change_is_dirty_and_digest_follows_content(repo: Path) -> None:
    model = repo / "src" / "model.py"
    model.write_text("LR = 0.2\n")
    first = git_state(repo)
    assert first["dirty"] is True and first["dirtyPaths"] == 1
    assert first["dirtyDigest"].startswith("sha256:") and len(first["dirtyDigest"]) == 7 + 64
    model.write_text("LR = 0.3\n")
    assert git_state(repo)["dirtyDigest"] != first["dirtyDigest"]
    model.write_text("LR = 0.2\n")
    assert git_state(repo)["dirtyDigest"] == first["dirtyDigest"]
    git(repo, "add", "src/model.py")  # staging the same bytes does not change what runs
    assert git_state(repo)["dirtyDigest"] == first["dirtyDigest"]


def test_deletion_and_untracked_files_are_dirty(repo: Path) -> None:
    (repo / "README.md").unlink()
    deleted = git_state(repo)
    assert deleted["dirty"] is True and deleted["dirtyPaths"] == 1
    (repo / "notes.txt").write_text("x\n")
    (repo / "debug.log").write_text("ignored\n")
    both = git_state(repo)
    assert both["dirtyPaths"] == 2 and both["dirtyDigest"] != deleted["dirtyDigest"]


def test_digest_is_independent_of_location_and_mtime(repo: Path, tmp_path: Path) -> None:
    def edit(root: Path) -> None:
        (root / "src" / "model.py").write_text("LR = 0.5\n")
        (root / "src" / "new_layer.py").write_text("def f(x):\n    return x\n")

    edit(repo)
    here = git_state(repo)
    copied = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(repo, copied)
    os.utime(copied / "src" / "model.py", (1_000_000, 1_000_000))
    os.utime(copied / "README.md", (1_000_000, 1_000_000))  # stat-dirty only: not a change
    cloned = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(cloned))
    edit(cloned)
    assert git_state(copied) == here
    assert git_state(cloned) == here


def test_flow_outputs_do_not_make_repo_dirty(repo: Path) -> None:
    (repo / "manifests" / "train").mkdir(parents=True)
    (repo / "manifests" / "train" / "stage.intoto.json").write_text("{}")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # tracked and modified
    (repo / "stages").mkdir()
    (repo / "stages" / "dvc.lock").write_text("x")
    (repo / ".dvc" / "tmp").mkdir(parents=True)
    (repo / ".dvc" / "tmp" / "rwlock").write_text("{}")
    assert git_state(repo)["dirty"] is False
    (repo / "manifests_notes.txt").write_text("not excluded\n")
    assert git_state(repo)["dirtyPaths"] == 1


def test_repo_without_commits_counts_everything_as_dirty(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("a\n")
    (tmp_path / "b.py").write_text("b\n")
    git(tmp_path, "add", "a.py")
    state = git_state(tmp_path)
    assert state["commit"] is None
    assert state["dirty"] is True and state["dirtyPaths"] == 2


def test_non_git_directory_reports_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    state = git_state(plain)
    assert state["error"] == "not a git repository"
    assert state["commit"] is None and state["dirty"] is None and state["dirtyDigest"] is None
    assert git_state(tmp_path / "missing")["error"]


# --- Transformer Engine probe ----------------------------------------------------------------------


class _FakeTE(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for an installed transformer_engine whose import fails the way it does without a GPU."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(fullname, self) if fullname == "transformer_engine" else None

    def exec_module(self, module: ModuleType) -> None:
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def te_modules_restored() -> Iterator[None]:
    """``sys.modules``' ``transformer_engine`` entries as they were before, whatever was imported meanwhile:
    megatron-core, imported later in this process, would take a stand-in left there for an installed
    Transformer Engine (and then fail to find its version)."""
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "transformer_engine"}
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine"]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture
def te_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_version = metadata.version

    def version(name: str) -> str:
        return "2.8.0" if name == "transformer-engine" else real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    with te_modules_restored():
        monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
        yield


def test_a_stand_in_transformer_engine_does_not_outlive_its_test(
    te_installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "meta_path", [_FakeTE(None), *sys.meta_path])
    before = sys.modules.get("transformer_engine")
    with te_modules_restored():
        monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
        assert probe_transformer_engine()["importable"] is True
        stand_in = sys.modules["transformer_engine"]
        assert isinstance(stand_in.__spec__.loader, _FakeTE)  # type: ignore[union-attr]
    assert sys.modules.get("transformer_engine") is before


def test_te_probe_reports_runtime_error_without_gpu(te_installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    error = RuntimeError("libcuda.so.1 not found in /usr/local/cuda/lib64\nsecond line")
    monkeypatch.setattr(sys, "meta_path", [_FakeTE(error), *sys.meta_path])
    probe = probe_transformer_engine()
    assert probe["installed"] is True and probe["version"] == "2.8.0"
    assert probe["importable"] is False
    assert probe["error"] == "RuntimeError: libcuda.so.1 not found in <path>"


def test_te_probe_importable(te_installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [_FakeTE(None), *sys.meta_path])
    assert probe_transformer_engine() == {
        "installed": True,
        "version": "2.8.0",
        "importable": True,
        "error": None,
    }


def test_te_probe_not_installed_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    def version(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(sys, "meta_path", [_FakeTE(AssertionError("must not import")), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    assert probe_transformer_engine() == {
        "installed": False,
        "version": None,
        "importable": False,
        "error": None,
    }


# --- numerics differences --------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "packages": {"torch": "2.13.0", "dvc": "3.67.1", "hydra-core": "1.3.8"},
    "torch": {"numThreads": 8, "matmulTf32": False, "deviceNames": ["NVIDIA H100"]},
    "envVars": {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"},
    "git": {"commit": "a" * 40, "dirty": False},
}


def test_identical_fingerprints_have_no_differences() -> None:
    assert numerics_differences(BASE, copy.deepcopy(BASE)) == []


def test_numerics_differences_classify_and_sort() -> None:
    new = copy.deepcopy(BASE)
    new["torch"]["numThreads"] = 4
    new["packages"]["dvc"] = "3.68.0"
    new["git"]["commit"] = "b" * 40
    new["envVars"]["OMP_NUM_THREADS"] = "4"
    del new["envVars"]["CUBLAS_WORKSPACE_CONFIG"]
    new["torch"]["matmulTf32"] = True
    diffs = numerics_differences(BASE, new)
    assert [d.key for d in diffs] == sorted(d.key for d in diffs)
    by_key = {d.key: d for d in diffs}
    assert set(by_key) == {
        "torch.numThreads",
        "packages.dvc",
        "git.commit",
        "envVars.OMP_NUM_THREADS",
        "envVars.CUBLAS_WORKSPACE_CONFIG",
        "torch.matmulTf32",
    }
    threads = by_key["torch.numThreads"]
    assert (threads.old, threads.new, threads.affects_numerics) == (8, 4, True)
    assert "reduction order" in threads.reason
    assert by_key["packages.dvc"].affects_numerics is False
    assert by_key["git.commit"].affects_numerics is False
    assert by_key["torch.matmulTf32"].affects_numerics is True
    added = by_key["envVars.OMP_NUM_THREADS"]
    assert (added.old, added.new, added.affects_numerics) == (None, "4", True) and "added" in added.reason
    removed = by_key["envVars.CUBLAS_WORKSPACE_CONFIG"]
    assert removed.affects_numerics is True and "removed" in removed.reason
    with pytest.raises(AttributeError):
        threads.key = "x"  # type: ignore[misc]


def test_type_change_is_a_difference() -> None:
    new = copy.deepcopy(BASE)
    new["torch"]["numThreads"] = 8.0
    new["torch"]["matmulTf32"] = 0
    assert [d.key for d in numerics_differences(BASE, new)] == ["torch.matmulTf32", "torch.numThreads"]


def test_difference_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        EnvDifference("k", 1, 2, True, "r")  # type: ignore[call-arg]


# --- CPU kernel pins (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA) --------------------------------


def test_the_reference_flow_pins_the_cpu_kernels_for_every_stage() -> None:
    """params/common/hydra.yaml sets the pins in hydra.job.env_set, which every recipe composes."""
    from hydra import compose, initialize_config_dir

    from flowpin.recipe_schema import register_schemas

    register_schemas(("tokenize", "train", "sft", "eval"))  # as each stage script does before it composes
    params = Path(__file__).resolve().parents[1] / "params"
    with initialize_config_dir(config_dir=str(params), version_base="1.3"):
        for name in ("tokenize", "pretrain", "sft", "eval"):
            env_set = compose(config_name=name, return_hydra_config=True).hydra.job.env_set
            assert dict(env_set) == {
                "ATEN_CPU_CAPABILITY": "avx2",
                "MKL_CBWR": "AVX2,STRICT",
                "ONEDNN_MAX_CPU_ISA": "AVX2",
            }, name


def test_cpu_pins_and_the_capability_in_use_are_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    in_use = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", in_use.lower())
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    env = fingerprint(Path.cwd())
    assert env["torch"]["cpuCapability"] == in_use
    assert {k: env["envVars"][k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")} == {
        "ATEN_CPU_CAPABILITY": in_use.lower(),
        "MKL_CBWR": "AVX2,STRICT",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    other = {**env, "envVars": {**env["envVars"], "MKL_CBWR": "AVX512"}, "torch": {**env["torch"]}}
    other["torch"]["cpuCapability"] = "AVX512"
    diffs = {d.key: d for d in numerics_differences(env, other)}
    assert set(diffs) == {"envVars.MKL_CBWR", "torch.cpuCapability"}
    assert all(d.affects_numerics and "instruction set" in d.reason for d in diffs.values())


def test_a_pin_that_is_not_in_effect_is_refused_not_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch fixed its kernels at its first dispatch: a pin naming other kernels would be a false claim."""
    import torch

    from flowpin.environment import check_cpu_pins
    from flowpin.errors import NumericsPinError

    in_use = torch.backends.cpu.get_cpu_capability()
    assert check_cpu_pins({"ATEN_CPU_CAPABILITY": in_use.lower()}) == in_use
    assert check_cpu_pins({}) == in_use  # nothing pinned: the capability is recorded, nothing to refuse
    wrong = "default" if in_use != "DEFAULT" else "avx2"
    with pytest.raises(NumericsPinError, match=rf"ATEN_CPU_CAPABILITY='{wrong}'.*kernels in this process are {in_use}"):
        check_cpu_pins({"ATEN_CPU_CAPABILITY": wrong})
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", wrong)
    with pytest.raises(NumericsPinError, match=r"hydra\.job\.env_set"):
        fingerprint(Path.cwd())  # what record() calls before it signs


def test_a_pin_set_before_torch_computes_selects_the_kernels(tmp_path: Path) -> None:
    """The mechanism the flow relies on: set after `import torch` (as Hydra's env_set does, before the stage
    function runs), ATEN_CPU_CAPABILITY still decides, and the fingerprint records what is in use."""
    import subprocess
    import sys

    code = (
        "import os, pathlib, torch, flowpin.environment as e\n"
        "os.environ['ATEN_CPU_CAPABILITY'] = 'default'\n"
        "torch.ones(3).exp()\n"
        "print(e.check_cpu_pins(), e.fingerprint(pathlib.Path.cwd())['torch']['cpuCapability'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["DEFAULT", "DEFAULT"]
