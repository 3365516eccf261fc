"""Process-level setup for training: the process group, megatron's parallel state, seeds and determinism.

This is the one module of the training engine with process-wide side effects, and the one place that
reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):

* :func:`init_distributed` joins (or, without a launcher, creates) the process group, initialises
  megatron's parallel state with TP = PP = 1 (data parallel over the whole world), and on a machine
  without CUDA applies :mod:`flowpin.train.megatron_cpu`. It returns a :class:`DistInfo` value that the
  rest of the code receives instead of reading the environment again. :func:`destroy` undoes it.
* :func:`set_deterministic` seeds every generator and switches on deterministic kernels, returning what it
  set so the manifest can record it.

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) the world is this one process, and its
rendezvous is an in-process ``HashStore``: no TCP port is opened, so parallel test workers cannot race for
one, and ``MASTER_ADDR``/``MASTER_PORT`` are neither needed nor changed.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flowpin.errors import FlowpinError
from flowpin.recipe import check_int
from flowpin.train import megatron_cpu

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""The variables ``torchrun`` sets for each worker (with ``MASTER_ADDR``/``MASTER_PORT``)."""
GPU_DETERMINISM_ENV: Mapping[str, str] = {
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS (read when cuBLAS initialises)
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",  # TE attention backends; megatron's deterministic_mode requires it
    "NCCL_ALGO": "Ring",  # a fixed all-reduce algorithm (the reduction order depends on it)
}
"""Environment :func:`set_deterministic` sets on a CUDA machine (FACTS: determinism flags)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistInfo:
    """Where this process sits in the training world (a value: pass it on, do not re-read the env)."""

    rank: int
    """Global rank (0 .. world_size-1)."""
    world_size: int
    """Number of processes; all of them data parallel (TP = PP = 1)."""
    local_rank: int
    """Rank on this machine; the CUDA device index on a GPU machine."""
    backend: str
    """torch.distributed backend: ``gloo`` (CPU) or ``nccl`` (GPU)."""
    device: str
    """``cpu`` or ``cuda``: where this process trains."""
    launcher: str
    """``torchrun`` (from its environment variables) or ``single`` (no launcher: world of one)."""
    cpu_patches: tuple[str, ...]
    """The :mod:`flowpin.train.megatron_cpu` patches active (empty on a GPU machine)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes reports, manifests and checkpoints metadata."""
        return self.rank == 0


def _launcher_env(environ: Mapping[str, str]) -> tuple[int, int, int] | None:
    present = [name for name in LAUNCHER_VARS if name in environ]
    if not present:
        return None
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
    if missing:
        raise FlowpinError(
            f"launcher environment incomplete: {', '.join(present)} set but {', '.join(missing)} missing; "
            "start with torchrun, or unset them to train as a single process"
        )
    values = {}
    for name in LAUNCHER_VARS:
        raw = environ.get(name, "0")
        try:
            values[name] = int(raw)
        except ValueError as exc:
            raise FlowpinError(f"launcher environment: {name}={raw!r} is not an integer") from exc
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise FlowpinError(f"launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} is inconsistent")
    return rank, world, local


def init_distributed(*, backend: str | None = None, environ: Mapping[str, str] | None = None) -> DistInfo:
    """Initialise the process group and megatron's parallel state (TP=1, PP=1, DP=world); once per process.

    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` without. ``environ`` (default ``os.environ``) is
    where the launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are read; without them the world is this
    process alone. Raises :class:`FlowpinError` if a process group already exists (call :func:`destroy`).
    """
    from megatron.core import parallel_state  # type: ignore[import-untyped,unused-ignore]

    env = os.environ if environ is None else environ
    launched = _launcher_env(env)
    if dist.is_initialized():
        raise FlowpinError("init_distributed: a process group already exists; call destroy() before re-initialising")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise FlowpinError(f"init_distributed: backend {backend!r} is not gloo or nccl")
    if backend == "nccl" and not cuda:
        raise FlowpinError("init_distributed: backend nccl needs CUDA; use gloo on a CPU machine")
    rank, world, local = launched if launched is not None else (0, 1, 0)
    if cuda:
        torch.cuda.set_device(local)
    if launched is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        patches = tuple(megatron_cpu.apply(enabled=not cuda))
    except BaseException:
        destroy()
        raise
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local,
        backend=backend,
        device="cuda" if cuda else "cpu",
        launcher="single" if launched is None else "torchrun",
        cpu_patches=patches,
    )


def destroy() -> None:
    """Tear down megatron's parallel state and the process group (safe to call when neither exists).

    The :mod:`~flowpin.train.megatron_cpu` patches stay: they are process-wide and idempotent.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_deterministic(seed: int, *, cpu_threads: int | None = None) -> dict[str, Any]:
    """Seed every generator and switch on deterministic algorithms; return what was set, for the manifest.

    Seeds Python's ``random``, NumPy's global generator, torch (CPU and every CUDA device) and, when
    megatron's parallel state is initialised, megatron's named RNG streams (``model_parallel_cuda_manual_seed``).
    ``torch.use_deterministic_algorithms(True)``. On CUDA also cuDNN deterministic/no benchmark and the
    :data:`GPU_DETERMINISM_ENV` variables; ``CUBLAS_WORKSPACE_CONFIG`` and ``NCCL_ALGO`` only take effect
    before cuBLAS / the first NCCL communicator start, so on a GPU call this *before*
    :func:`init_distributed` (megatron's streams are then seeded by :func:`flowpin.train.model.build_model`,
    or by calling this again). On CPU, ``cpu_threads`` (if given) fixes torch's intra-op threads, and the
    thread counts in force are recorded either way: kernels may split reductions by thread, so bitwise
    reproducibility is only promised at the same count.
    """
    check_int(seed, "seed", minimum=0, maximum=2**32 - 1)
    from megatron.core import parallel_state, tensor_parallel

    if cpu_threads is not None:
        check_int(cpu_threads, "cpu_threads", minimum=1, maximum=4096)
        torch.set_num_threads(cpu_threads)
    random.seed(seed)
    np.random.seed(seed)  # the legacy global generator, for third-party code that still draws from it
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True)
    cuda = torch.cuda.is_available()
    env_set: dict[str, str] = {}
    if cuda:
        for name, value in GPU_DETERMINISM_ENV.items():
            os.environ[name] = value
            env_set[name] = value
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    megatron_streams = False
    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        megatron_streams = True
    return {
        "seed": seed,
        "device": "cuda" if cuda else "cpu",
        "deterministicAlgorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnnDeterministic": bool(torch.backends.cudnn.deterministic) if cuda else None,
        "cudnnBenchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
        "env": env_set,
        "megatronRngStreams": megatron_streams,
        "numThreads": torch.get_num_threads(),
        "numInteropThreads": torch.get_num_interop_threads(),
    }
