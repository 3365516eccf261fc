"""The process a training or evaluation stage runs in, prepared once, at its entry point.

Everything process-wide a stage needs happens in :func:`prepare_environment`, called by the entry points
only -- the stage scripts' one body (:func:`flowpin.train.entry.run_training_stage`), the eval stage script
and ``flowpin fork`` -- never by library code (OLMo-core's ``prepare_environment()``, torchtitan's
``init_distributed``). On entry, in this order:

1. the environment variables the entry point pins (``flowpin fork``: the recipe's ``hydra.job.env_set``, the
   CPU kernel pins a Hydra run of the stage applies itself) and, on a CUDA machine, the deterministic-library
   variables (:data:`~flowpin.train.distributed.GPU_DETERMINISM_ENV`: read when cuBLAS and NCCL start, so
   set before anything starts them);
2. the process group and megatron's parallel state (:func:`flowpin.train.distributed.init_distributed`),
   which on a machine without CUDA applies megatron-core's reviewed CPU patches
   (:mod:`flowpin.train.megatron_cpu`);
3. determinism (:func:`flowpin.train.distributed.set_deterministic`): seeds (Python, numpy, torch, megatron's
   named streams), torch's intra-op threads, deterministic kernels. What it set is the :class:`Runtime`'s
   ``determinism`` record, which reports copy.

On exit (after the stage recorded its manifest, whose environment fingerprint reads the settings in force),
everything is put back: the process group and parallel state are destroyed, the CPU patches this call
applied are restored (none stays applied for the rest of the process), torch's threads and
deterministic-algorithm flags return to their earlier values, and the environment variables to theirs.

Library code takes the :class:`Runtime`'s values (``dist``, ``determinism``) as arguments and changes no
process state; a test gets the same process a stage gets by entering :func:`prepare_environment`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from collections.abc import Iterator, Mapping
from typing import Any

from flowpin.train.distributed import GPU_DETERMINISM_ENV, DistInfo, destroy, init_distributed, set_deterministic


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """The prepared process, as values (what :func:`prepare_environment` yields)."""

    dist: DistInfo
    """Where this process sits in the training world (rank, world size, device, CPU patches)."""
    determinism: Mapping[str, Any]
    """What :func:`~flowpin.train.distributed.set_deterministic` set: seed, device, deterministic flags,
    environment, megatron streams, thread counts (a report's ``determinism``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "determinism", types.MappingProxyType(dict(self.determinism)))


@contextlib.contextmanager
def prepare_environment(
    *,
    seed: int,
    threads: int | None,
    env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[Runtime]:
    """Prepare this process for a stage (see the module docstring); undo it on exit.

    ``seed`` and ``threads`` are the recipe's (``loop.seed``, ``threads``); ``env`` are variables to set for
    the duration, before anything computes (``flowpin fork``'s CPU kernel pins); ``environ`` is where the
    launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are read (default ``os.environ``).
    """
    import torch

    from flowpin.train import megatron_cpu

    variables = dict(env or {})
    if torch.cuda.is_available():
        variables.update(GPU_DETERMINISM_ENV)
    saved_threads = torch.get_num_threads()
    saved_flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    saved_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    patched_before = set(megatron_cpu.applied())
    with _environment(variables):
        dist = init_distributed(environ=environ)
        try:
            determinism = set_deterministic(seed, cpu_threads=threads)
            yield Runtime(dist=dist, determinism=determinism)
        finally:
            destroy()
            megatron_cpu.restore(only=[name for name in dist.cpu_patches if name not in patched_before])
            torch.use_deterministic_algorithms(saved_flags[0], warn_only=saved_flags[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_cudnn
            torch.set_num_threads(saved_threads)


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``variables`` set for the duration (and :func:`set_deterministic`'s own changes
    undone afterwards), as it was before on exit."""
    names = set(variables) | set(GPU_DETERMINISM_ENV)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
