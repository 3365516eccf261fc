"""Process-level setup for training: the process group, megatron's parallel state, seeds and determinism.

This module holds the training engine's process-wide primitives; entry points use them through
:func:`flowpin.runtime.prepare_environment` (which also undoes them when the stage ends), library code never
calls them. The launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) it reads through
:mod:`flowpin.train.launcher`:

* :func:`init_distributed` joins (or, without a launcher, creates) the process group, initialises
  megatron's parallel state with TP = PP = 1 (data parallel over the whole world), and on a machine
  without CUDA applies :mod:`flowpin.train.megatron_cpu`. It returns a :class:`DistInfo` value that the
  rest of the code receives instead of reading the environment again. :func:`destroy` undoes it.
* :func:`set_deterministic` seeds every generator and switches on deterministic kernels, returning what it
  set so the manifest can record it.
* The few collectives data-parallel training needs (:func:`average_gradients`, :func:`average`,
  :func:`gather_digests`, :func:`barrier`), each in a fixed order so that a run is bitwise the same every
  time; :mod:`flowpin.train.loop` calls them, it never touches ``torch.distributed`` itself.

Without ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment) the world is this one process, and its
rendezvous is an in-process ``HashStore``: no TCP port is opened, so parallel test workers cannot race for
one, and ``MASTER_ADDR``/``MASTER_PORT`` are neither needed nor changed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flowpin.errors import FlowpinError
from flowpin.recipe import check_int
from flowpin.train import cpu_warnings, megatron_cpu
from flowpin.train.launcher import launcher_env

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


def init_distributed(*, backend: str | None = None, environ: Mapping[str, str] | None = None) -> DistInfo:
    """Initialise the process group and megatron's parallel state (TP=1, PP=1, DP=world); once per process.

    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` without. ``environ`` (default ``os.environ``) is
    where the launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are read; without them the world is this
    process alone. Raises :class:`FlowpinError` if a process group already exists (call :func:`destroy`).
    When megatron runs without Transformer Engine and Apex, rank 0 says so on stderr, once per process
    (:func:`flowpin.train.cpu_warnings.reference_path_line`).
    """
    from megatron.core import parallel_state  # type: ignore[import-untyped,unused-ignore]

    env = os.environ if environ is None else environ
    launched = launcher_env(env)
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
    if rank == 0:
        _announce_reference_path(cuda=cuda)
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local,
        backend=backend,
        device="cuda" if cuda else "cpu",
        launcher="single" if launched is None else "torchrun",
        cpu_patches=patches,
    )


_announced = False


def _announce_reference_path(*, cuda: bool) -> None:
    """Print, once per process, the line that says megatron runs its fallbacks (no TE, no Apex), if it does:
    it stands for the import warnings :mod:`flowpin.train.cpu_warnings` filters."""
    global _announced
    if _announced:
        return
    _announced = True
    line = cpu_warnings.reference_path_line(cuda=cuda)
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def destroy() -> None:
    """Tear down megatron's parallel state and the process group (safe to call when neither exists).

    The :mod:`~flowpin.train.megatron_cpu` patches stay (they are idempotent);
    :func:`flowpin.runtime.prepare_environment` restores the ones its :func:`init_distributed` applied.
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
    before cuBLAS / the first NCCL communicator start: :func:`flowpin.runtime.prepare_environment` sets them
    before :func:`init_distributed` and calls this after it (so megatron's streams are seeded too). On CPU,
    ``cpu_threads`` (if given) fixes torch's intra-op threads, and the thread counts in force are recorded
    either way: kernels may split reductions by thread, so bitwise reproducibility is only promised at the
    same count.
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


# --- data-parallel collectives (used by flowpin.train.loop) ----------------------------------------------

GRAD_BUCKET_ELEMENTS = 1 << 25
"""Most gradient elements one all-reduce carries (128 MiB of fp32). Bucket boundaries are a function of
the parameter shapes alone, so they are the same every run; with more than two ranks they are part of what
fixes the summation order of each element."""


def _collective_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    """Where collective buffers live: with the parameters (NCCL needs CUDA tensors, gloo takes CPU ones)."""
    return tensors[0].device if tensors else torch.device("cpu")


def average_gradients(
    params: Sequence[torch.Tensor], *, world_size: int, bucket_elements: int = GRAD_BUCKET_ELEMENTS
) -> None:
    """Replace every parameter's ``.grad`` by its mean over the ``world_size`` ranks, identically on each.

    Deterministic by construction: gradients are flattened into buckets in the order of ``params`` (a new
    bucket when the dtype changes or the bucket would exceed ``bucket_elements``), each bucket is summed
    with one ``all_reduce(SUM)`` and divided by ``world_size`` (exact for a power of two). Every rank gets
    the same bits: an all-reduce hands every rank the one reduced value of each element. A parameter whose
    grad is ``None`` on some ranks but not others contributes zeros there (as a single process would
    accumulate it); one that has no grad on any rank keeps ``None`` (AdamW then skips it, as it would
    alone). Which ranks hold grads is agreed first with a small float64 all-reduce, so the buckets always
    match in shape. Every rank must call this with the same parameters in the same order.
    """
    check_int(world_size, "world_size", minimum=1)
    check_int(bucket_elements, "bucket_elements", minimum=1)
    if not params:
        return
    device = _collective_device(params)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    grads: list[torch.Tensor] = []
    for param, count in zip(params, present.tolist(), strict=True):
        if count == 0:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        if bucket and (grad.dtype != bucket[0].dtype or size + grad.numel() > bucket_elements):
            _reduce_bucket(bucket, world_size)
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        _reduce_bucket(bucket, world_size)


def _reduce_bucket(grads: list[torch.Tensor], world_size: int) -> None:
    flat = torch.cat([g.detach().reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size)
    offset = 0
    for grad in grads:
        grad.detach().copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def average(value: torch.Tensor, *, world_size: int) -> torch.Tensor:
    """The mean over ranks of ``value`` (a new tensor, equal on every rank): ``all_reduce(SUM) / world_size``.

    Reduced in ``value``'s dtype, promoted to at least float32. For a float32 loss over two ranks this is
    bitwise what one process computes as ``(loss_0 + loss_1) / 2``.
    """
    check_int(world_size, "world_size", minimum=1)
    dtype = torch.promote_types(value.dtype, torch.float32)
    buf = value.detach().to(dtype=dtype, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf / world_size


def gather_digests(digest: bytes, *, world_size: int, device: torch.device | str = "cpu") -> list[bytes]:
    """Every rank's ``digest`` (same length on every rank), by rank; an ``all_gather`` of bytes, no pickle."""
    check_int(world_size, "world_size", minimum=1)
    mine = torch.tensor(list(digest), dtype=torch.uint8, device=device)
    out = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(out, mine)
    return [bytes(t.cpu().tolist()) for t in out]


def barrier() -> None:
    """Wait until every rank of the default process group arrives here."""
    dist.barrier()


def check_process_group(rank: int, world_size: int) -> str:
    """Raise :class:`FlowpinError` unless the default process group exists and matches; return its backend."""
    if not dist.is_initialized():
        raise FlowpinError(
            f"data parallel over {world_size} ranks needs a process group; call "
            "flowpin.train.distributed.init_distributed() under torchrun first"
        )
    actual = (dist.get_rank(), dist.get_world_size())
    if actual != (rank, world_size):
        raise FlowpinError(
            f"data parallel: told rank {rank} of {world_size}, but the process group has rank {actual[0]} of "
            f"{actual[1]}; pass the DistInfo that init_distributed() returned"
        )
    return str(dist.get_backend())
