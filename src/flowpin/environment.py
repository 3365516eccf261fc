"""The environment that can change numerics, as recorded in every stage manifest.

This module owns two records and one comparison:

* :func:`fingerprint` is *identity*: interpreter, OS, CPU model and SIMD flags, package versions (read
  from metadata, never by importing), torch's numerics switches, the Transformer Engine probe, the
  environment variables that steer kernels, and the git state of the checkout. It is hashed with the
  manifest, so it holds only canonical-JSON values and nothing host- or location-specific (no hostname,
  absolute path, PID, user or time).
* :func:`run_context` is *metadata* about one run (host, PID, user, executable, cwd); never compared.
* :func:`numerics_differences` says which fingerprint differences can change floating-point results.

Probing has side effects (it imports torch and, if installed, transformer_engine; on a GPU machine it
initialises CUDA to read device names), so call it from a stage entry point, not from library code.
"""

from __future__ import annotations

import fnmatch
import getpass
import hashlib
import importlib
import os
import platform
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from flowpin import settings

PACKAGES = (
    *("torch", "megatron-core", "transformer-engine", "numpy"),  # kernels: can change numerics
    *("dvc", "hydra-core", "omegaconf", "aim", "flowpin"),  # flow tooling
    *("zstandard", "safetensors", "cryptography", "blake3", "jsonschema"),  # storage, hashing, signing
    *("tokenizers", "datasketch"),  # data preparation
)
CPU_ISA_PINS = (
    "ATEN_CPU_CAPABILITY",  # which of torch's per-ISA kernel builds runs (default, avx2, avx512, ...)
    "MKL_CBWR",  # MKL's conditional numerical reproducibility: one code branch (e.g. AVX2) on every CPU
    "MKL_ENABLE_INSTRUCTIONS",  # the highest instruction set MKL may dispatch to
    "ONEDNN_MAX_CPU_ISA",  # the same for oneDNN (torch's mkldnn kernels)
    "DNNL_MAX_CPU_ISA",  # its older name
)
"""Environment variables that pin which instruction set torch's CPU kernels, MKL and oneDNN use.

Each library reads its variable once, at its first use; the reference flow sets them in Hydra's
``hydra.job.env_set`` (``params/common/hydra.yaml``), which applies before the stage function runs its first
computation. They are identity (``envVars``) and :func:`check_cpu_pins` refuses a process whose torch kernels
are not the ones pinned."""

_TE_DISTS = ("transformer-engine", "transformer-engine-cu12", "transformer-engine-cu13")
_ENV_NAMES = frozenset(
    {
        *("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"),
        *("CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING"),
        *("NCCL_ALGO", "NCCL_PROTO", "PYTHONHASHSEED", "TOKENIZERS_PARALLELISM"),
        *CPU_ISA_PINS,
    }
)
_ENV_PREFIXES = ("NVTE_", "TORCH_", "FLOWPIN_")
# Paths (signing key, root), and switches that cannot change what a stage computes (tracking, progress bars).
_ENV_SKIP = frozenset(
    {
        *(settings.SIGNING_KEY, settings.ROOT, settings.TRACKING, settings.AIM_REPO, settings.PROGRESS),
        settings.STALE_CHECKPOINTS,  # what to do with checkpoints of another run key: never what is computed
    }
)
# Prefixes of CPU flags that select SIMD kernels (x86 'flags', then ARM 'Features').
_FLAG_PREFIXES = (
    *("avx", "amx", "fma", "f16c", "sha_ni", "sse", "ssse3", "bmi", "popcnt", "adx", "vaes", "vpclmulqdq"),
    *("gfni", "asimd", "sve", "bf16", "i8mm", "fphp"),
)
# What the flow itself writes while it runs (manifests, DVC lock files, metrics reports) and the trust
# store (keys/) cannot change what a stage computes: they are not "code".
_GIT_EXCLUDES = (
    ":(exclude)manifests",
    ":(exclude)reports",
    ":(exclude)keys",
    ":(exclude,glob)**/dvc.lock",
    ":(exclude).dvc/tmp",
)
_ABS_PATH = re.compile(r"(?<![\w.])(?:/|~/|[A-Za-z]:[\\/])[^\s'\"]*")


def fingerprint(root: Path) -> dict[str, Any]:
    """The identity part of the environment, with ``root`` the checkout whose git state is recorded."""
    result: dict[str, Any] = {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "compiler": platform.python_compiler(),
        },
        "os": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "libc": list(platform.libc_ver()),
        },
        "cpu": _cpu(_read_cpuinfo()),
        "packages": {name: _dist_version(name) for name in PACKAGES},
        "transformerEngine": probe_transformer_engine(),
        "envVars": numerics_env_vars(os.environ),
        "git": git_state(root),
    }
    check_cpu_pins()  # a pin that is not in effect is refused, never recorded
    torch_state = _torch_state()
    if torch_state is not None:
        result["torch"] = torch_state
    return result


def check_cpu_pins(environ: Mapping[str, str] | None = None) -> str | None:
    """The ATen CPU capability in use, refused unless it is the one ``ATEN_CPU_CAPABILITY`` pins.

    torch reads the variable once, at the first kernel it dispatches, and silently keeps its own choice
    when the variable is set later or names an instruction set this CPU lacks: either way the run would
    record a pin it did not use. Raises :class:`~flowpin.errors.NumericsPinError` then. ``None`` when this
    process has not loaded torch (its kernels ran nothing). MKL's ``MKL_CBWR`` and oneDNN's
    ``ONEDNN_MAX_CPU_ISA`` cannot be read back from torch's build (their query functions are not
    exported); they are recorded as set, and applied the same way (before the stage's first computation).
    """
    if "torch" not in sys.modules:
        return None
    import torch

    environ = os.environ if environ is None else environ
    in_use = str(torch.backends.cpu.get_cpu_capability())
    pinned = environ.get("ATEN_CPU_CAPABILITY")
    if pinned is not None and pinned.strip().upper() != in_use.upper():
        from flowpin.errors import NumericsPinError

        raise NumericsPinError(
            f"ATEN_CPU_CAPABILITY={pinned!r}, but torch's CPU kernels in this process are {in_use}: the variable was "
            "set after torch dispatched its first kernel, or this CPU lacks that instruction set "
            f"(its SIMD flags: {' '.join(_cpu(_read_cpuinfo())['flags']) or 'unknown'}); set it before the run "
            "starts (the reference flow sets it in params/common/hydra.yaml, hydra.job.env_set) to a capability "
            "this CPU has"
        )
    return in_use


def probe_transformer_engine() -> dict[str, Any]:
    """Whether Transformer Engine is installed and importable; importing it raises RuntimeError w/o GPU."""
    version = next((v for v in map(_dist_version, _TE_DISTS) if v is not None), None)
    out: dict[str, Any] = {
        "installed": version is not None,
        "version": version,
        "importable": False,
        "error": None,
    }
    if version is not None:
        try:
            importlib.import_module("transformer_engine")
            out["importable"] = True
        except Exception as exc:  # RuntimeError without a GPU, ImportError for a broken build, ...
            out["error"] = _scrub(f"{type(exc).__name__}: {exc}")
    return out


def git_state(root: Path) -> dict[str, Any]:
    """Commit and a location-independent digest of uncommitted changes of the checkout at ``root``.

    Dirty paths are what ``git status`` reports against HEAD (staged or not) plus untracked, non-ignored
    files, outside ``manifests/``, ``reports/``, ``keys/``, ``dvc.lock`` and ``.dvc/tmp``. The digest covers
    each dirty path (relative to the repository top) with the sha256 of its current bytes, its executable bit, or its
    deletion, sorted by path. It hashes content rather than ``git diff`` text, whose bytes depend on user
    git config (diff.algorithm, indentHeuristic, abbrev, noprefix, renames), not only on the tree.
    """
    if not root.is_dir():
        return _git_error("root is not a directory")
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel").decode().rstrip("\n"))
        head = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD^{commit}"],
            cwd=root,
            capture_output=True,
            env=_git_env(),
            check=False,
        )
        status = _git(
            root,
            "status",
            "--porcelain=v1",
            "-z",
            "--no-renames",
            "--untracked-files=all",
            "--",
            ".",
            *_GIT_EXCLUDES,
        )
    except FileNotFoundError:
        return _git_error("git executable not found")
    except _GitError as exc:
        return _git_error(str(exc))
    commit = head.stdout.decode().strip() if head.returncode == 0 else None
    paths = sorted({entry[3:] for entry in status.split(b"\0") if len(entry) > 3})
    digest = None
    if paths:
        h = hashlib.sha256(b"flowpin.git-dirty.v1\n")
        for rel in paths:
            record = _path_record(top / os.fsdecode(rel))
            h.update(b"%d:%s %d:%s\n" % (len(rel), rel, len(record), record))
        digest = "sha256:" + h.hexdigest()
    return {"commit": commit, "dirty": bool(paths), "dirtyDigest": digest, "dirtyPaths": len(paths)}


def run_context() -> dict[str, Any]:
    """Metadata describing this run (not identity): host, PID, user, interpreter path, cwd."""
    try:
        user: str | None = getpass.getuser()
    except Exception:  # no passwd entry / no USER in containers
        user = None
    try:
        cwd: str | None = str(Path.cwd())
    except OSError:  # cwd was deleted
        cwd = None
    return {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "user": user,
        "executable": sys.executable,
        "cwd": cwd,
    }


@dataclass(frozen=True, kw_only=True)
class EnvDifference:
    """One fingerprint key that differs between two runs."""

    key: str  # dotted path, e.g. "torch.numThreads"
    old: Any  # None also when the key is absent in the old fingerprint (see reason)
    new: Any
    affects_numerics: bool  # True if the change is known to alter floating-point results bitwise
    reason: str


# Space-separated fnmatch patterns over dotted fingerprint keys -> why a change alters float results
# bitwise. Keys matching none are recorded for audit only (git state, dvc/hydra versions, ...).
_NUMERICS_RULES = (
    ("packages.torch packages.numpy packages.megatron-core packages.transformer-engine", "kernels change"),
    ("torch.version torch.cuda torch.cudnn", "torch/CUDA/cuDNN build changes kernels"),
    ("torch.numThreads", "intra-op thread count changes reduction order"),
    ("torch.numInteropThreads", "inter-op thread count changes how parallel work is split"),
    ("torch.deterministic* torch.cudnnDeterministic torch.cudnnBenchmark", "changes kernel selection"),
    ("torch.*Tf32 torch.float32MatmulPrecision", "TF32/reduced-precision matmul changes rounding"),
    ("torch.defaultDtype", "default floating-point precision changes"),
    ("torch.deviceNames torch.cudaAvailable", "a different accelerator runs different kernels"),
    ("transformerEngine.*", "Transformer Engine presence changes fused kernels and FP8 paths"),
    ("cpu.model cpu.flags cpu.flagsDigest os.machine", "CPU/SIMD features select different kernels"),
    (
        "torch.cpuCapability envVars.ATEN_CPU_CAPABILITY envVars.MKL_CBWR envVars.MKL_ENABLE_INSTRUCTIONS "
        "envVars.ONEDNN_MAX_CPU_ISA envVars.DNNL_MAX_CPU_ISA",
        "selects which instruction set torch's, MKL's or oneDNN's CPU kernels use",
    ),
    ("cpu.logicalCount", "default OpenMP/BLAS thread counts derive from the core count"),
    ("os.libc", "libm may round transcendental functions differently"),
    (
        "envVars.OMP_NUM_THREADS envVars.MKL_NUM_THREADS envVars.OPENBLAS_NUM_THREADS",
        "changes reduction order",
    ),
    ("envVars.CUBLAS_WORKSPACE_CONFIG", "cuBLAS workspace config controls deterministic GEMMs"),
    ("envVars.NVTE_*", "changes Transformer Engine kernel selection"),
    ("envVars.NCCL_*", "NCCL algorithm/protocol changes all-reduce summation order"),
)


def numerics_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[EnvDifference]:
    """Every dotted key whose value differs between fingerprints ``a`` (old) and ``b`` (new), sorted."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    out = []
    for key in sorted(flat_a.keys() | flat_b.keys()):
        old, new = flat_a.get(key), flat_b.get(key)
        if key in flat_a and key in flat_b and type(old) is type(new) and old == new:
            continue
        affects, reason = _classify(key)
        if key not in flat_a or key not in flat_b:
            reason += f" (key {'added' if key not in flat_a else 'removed'})"
        out.append(EnvDifference(key=key, old=old, new=new, affects_numerics=affects, reason=reason))
    return out


# --- helpers ---------------------------------------------------------------------------------------


class _GitError(Exception):
    pass


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu(cpuinfo: str) -> dict[str, Any]:
    """CPU identity from /proc/cpuinfo text (first processor); 'Features' is the ARM name for flags."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = sorted(set((fields.get("flags") or fields.get("Features") or "").split()))
    simd = [f for f in flags if f.startswith(_FLAG_PREFIXES)]
    return {
        "model": fields.get("model name") or platform.processor() or None,
        "logicalCount": os.cpu_count(),
        "flags": simd,
        # Over the SIMD flags only (what selects kernels): two machines that differ in, say, `hypervisor` or a
        # microcode bug flag run the same kernels and must not be told their numerics may differ.
        "flagsDigest": hashlib.sha256(" ".join(simd).encode()).hexdigest(),
    }


def numerics_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The set variables that steer numerics; absolute-path values are skipped (location, not identity)."""
    return {
        name: value
        for name, value in sorted(environ.items())
        if (name in _ENV_NAMES or name.startswith(_ENV_PREFIXES))
        and name not in _ENV_SKIP
        and not any(_ABS_PATH.match(part) for part in value.split(os.pathsep))
    }


def _torch_state() -> dict[str, Any] | None:
    """torch's numerics switches, read only when this process has already loaded torch.

    A stage that never imports torch cannot be affected by its thread or determinism settings, and
    importing it just to read them cost ~1 s per stage (a third of a small data stage); its version is
    recorded under ``packages`` either way, and ``{"loaded": false}`` says the switches were not in play.
    """
    if "torch" not in sys.modules:
        return {"loaded": False}
    import torch  # already loaded: free

    cuda = torch.cuda.is_available()
    cudnn = torch.backends.cudnn
    cudnn_version = cudnn.version() if cudnn.is_available() else None  # type: ignore[no-untyped-call]
    return {
        "loaded": True,
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn_version,
        "cudaAvailable": cuda,
        # get_device_name initialises CUDA (fork after it is unsafe for CUDA-using children).
        "deviceNames": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if cuda else 0)],
        # The kernel build ATen dispatches to (reading it fixes the choice for the process; by then the
        # stage has computed, so it is the one used). ATEN_CPU_CAPABILITY pins it: see CPU_ISA_PINS.
        "cpuCapability": torch.backends.cpu.get_cpu_capability(),
        "numThreads": torch.get_num_threads(),
        # Safe to read: it reports the configured/default size without starting the inter-op pool, so a
        # later torch.set_num_interop_threads still works (checked on torch 2.13; only running inter-op
        # work or a previous set makes set_num_interop_threads raise).
        "numInteropThreads": torch.get_num_interop_threads(),
        "deterministicAlgorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministicWarnOnly": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnnDeterministic": bool(cudnn.deterministic),
        "cudnnBenchmark": bool(cudnn.benchmark),
        "matmulTf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnnTf32": bool(cudnn.allow_tf32),
        "float32MatmulPrecision": torch.get_float32_matmul_precision(),
        "defaultDtype": str(torch.get_default_dtype()),
    }


def _git_env() -> dict[str, str]:
    # No optional index writes (we may run beside the flow's own git/dvc calls); fixed, unquoted output.
    return {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}


def _git(root: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, env=_git_env(), check=False)
    if proc.returncode != 0:
        # Our own short reason: git's stderr can name absolute paths, which must not enter a fingerprint.
        if b"not a git repository" in proc.stderr:
            raise _GitError("not a git repository")
        raise _GitError(f"git {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def _git_error(reason: str) -> dict[str, Any]:
    return {"commit": None, "dirty": None, "dirtyDigest": None, "dirtyPaths": None, "error": reason}


def _path_record(path: Path) -> bytes:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return b"deleted"
    if stat.S_ISLNK(st.st_mode):
        return b"link " + os.fsencode(path.readlink())
    if not stat.S_ISREG(st.st_mode):
        return b"other"  # e.g. an embedded repository or submodule directory
    with path.open("rb") as fh:
        content = hashlib.file_digest(fh, "sha256").hexdigest().encode()
    return (b"exec " if st.st_mode & 0o111 else b"file ") + content


def _scrub(text: str, limit: int = 300) -> str:
    return _ABS_PATH.sub("<path>", text.splitlines()[0] if text else text)[:limit]


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping):
            out.update(_flatten(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def _classify(key: str) -> tuple[bool, str]:
    for patterns, reason in _NUMERICS_RULES:
        if any(fnmatch.fnmatchcase(key, p) for p in patterns.split()):
            return True, reason
    return False, "recorded for audit; not known to change floating-point results"
