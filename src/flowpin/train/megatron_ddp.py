"""Megatron's ``DistributedDataParallel`` as the training loop's gradient engine (recipe ``train.data_parallel``).

Two engines reduce gradients across data-parallel ranks:

* ``flowpin`` (default): :func:`flowpin.train.distributed.average_gradients`, fixed buckets in optimizer
  order, one ``all_reduce(SUM)`` each, then ``/ W``.
* ``megatron``: megatron-core's ``DistributedDataParallel`` owns contiguous fp32 grad buffers
  (``param.main_grad``); its backward hooks accumulate every gradient into them, and
  ``finish_grad_sync`` scales each bucket by ``1 / W`` and all-reduces it. The loop then points each
  ``param.grad`` at its ``main_grad`` and clips and steps as always -- so checkpoints keep their format
  (the loop still trains the bare module; the wrapper only adds hooks and buffers).

Measured (tests/train/test_megatron_ddp.py, tests/train/test_data_parallel.py): with fp32 parameters the two engines
give bitwise-identical checkpoints at world size 1 (copy into a zeroed buffer, scale by 1.0) and at world
size 2 (halving is exact, and a sum of two is commutative); the engine is recorded with the determinism
settings all the same, because with more ranks or bf16 gradients it can change the bits.

On a CPU machine the buffers live on CPU (one reviewed patch in :mod:`flowpin.train.megatron_cpu`) and the
collectives run on gloo. Not supported yet, and refused by the recipe: megatron's *distributed optimizer*
(``use_distributed_optimizer``). Its optimizer state is sharded across ranks and its megatron optimizer
object is CUDA-only in megatron-core 0.16.1 (``FP32Optimizer`` puts its loss scale on ``cuda``), and
flowpin's checkpoints would need a pickle-free gather of the shards -- code that can only be tested on a
GPU machine. ``overlap_grad_reduce`` is allowed: the reduction waits for every bucket before the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from flowpin.errors import RecipeError
from flowpin.recipe import check_choice, check_int

ENGINES = ("flowpin", "megatron")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataParallelConfig:
    """How gradients are reduced across data-parallel ranks (keys ``train.data_parallel.*``)."""

    engine: str = "flowpin"
    """``flowpin`` (fixed-bucket all-reduce) or ``megatron`` (megatron-core ``DistributedDataParallel``)."""
    grad_reduce_in_fp32: bool = True
    """megatron: keep the grad buffers (and their all-reduce) in fp32 whatever the parameter dtype."""
    overlap_grad_reduce: bool = False
    """megatron: start each bucket's all-reduce as soon as its gradients are ready (async)."""
    bucket_size: int | None = None
    """megatron: elements per bucket (``None``: megatron's default, one bucket without overlap)."""
    use_distributed_optimizer: bool = False
    """megatron: shard optimizer state (and fp32 main weights) across ranks. ``flowpin plan`` plans it; the engine
    refuses to train it yet (:func:`refuse_untrained_optimizer`, see the module docstring)."""

    def __post_init__(self) -> None:
        check_choice(self.engine, ENGINES, "train.data_parallel.engine")
        if self.bucket_size is not None:
            check_int(self.bucket_size, "train.data_parallel.bucket_size", minimum=1)
        for name in ("grad_reduce_in_fp32", "overlap_grad_reduce", "use_distributed_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"train.data_parallel.{name}: {getattr(self, name)!r} must be true or false")
        if self.engine == "flowpin" and (self.overlap_grad_reduce or self.bucket_size is not None):
            raise RecipeError(
                "train.data_parallel: overlap_grad_reduce and bucket_size are megatron DDP settings; set "
                "engine: megatron or leave them at false/null"
            )

    def settings(self) -> dict[str, Any]:
        """What is recorded with the determinism settings of every checkpoint (the engine can change bits)."""
        if self.engine == "flowpin":
            return {"data_parallel_engine": "flowpin"}
        return {
            "data_parallel_engine": "megatron",
            "megatron_ddp": {
                "grad_reduce_in_fp32": self.grad_reduce_in_fp32,
                "overlap_grad_reduce": self.overlap_grad_reduce,
                "bucket_size": self.bucket_size,
            },
        }


def refuse_untrained_optimizer(cfg: DataParallelConfig) -> None:
    """Refuse ``use_distributed_optimizer``, which the engine does not train yet (a valid recipe value: the
    planner plans it), with :class:`RecipeError`; never train without it while the recipe says it was used."""
    if cfg.use_distributed_optimizer:
        raise RecipeError(
            "train.data_parallel.use_distributed_optimizer: `flowpin plan` plans megatron's distributed optimizer, "
            "but the training engine does not train it yet (its sharded state has no pickle-free checkpoint path in "
            "flowpin until issues 16 and 17 land); set it to false to train"
        )


def ddp_config(cfg: DataParallelConfig) -> Any:
    """megatron-core's ``DistributedDataParallelConfig`` for ``cfg`` (engine ``megatron``)."""
    from megatron.core.distributed import DistributedDataParallelConfig  # type: ignore[import-untyped,unused-ignore]

    if cfg.engine != "megatron":
        raise RecipeError(f"train.data_parallel.engine: {cfg.engine!r} has no megatron DDP config")
    refuse_untrained_optimizer(cfg)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        bucket_size=cfg.bucket_size,
        use_distributed_optimizer=False,
        check_for_nan_in_grad=False,  # the loop checks the loss and grad norm itself, with a named error
    )


class MegatronGradSync:
    """The loop's gradient hook for engine ``megatron``: zero the buffers, reduce them, expose them as ``.grad``.

    Wraps ``module`` (a megatron ``GPTModel``, which carries its ``TransformerConfig`` as ``.config``) in
    ``DistributedDataParallel``; the loop keeps training ``module`` itself.
    """

    def __init__(self, module: torch.nn.Module, cfg: DataParallelConfig) -> None:
        from megatron.core.distributed import DistributedDataParallel  # type: ignore[import-untyped,unused-ignore]

        config = getattr(module, "config", None)
        if config is None:
            raise RecipeError(
                "train.data_parallel.engine: megatron DDP wraps a megatron model (one with a TransformerConfig "
                f"as .config); {type(module).__name__} has none -- use engine: flowpin"
            )
        self.cfg = cfg
        self.ddp = DistributedDataParallel(config=config, ddp_config=ddp_config(cfg), module=module)

    def settings(self) -> dict[str, Any]:
        return self.cfg.settings()

    def before_backward(self) -> None:
        self.ddp.zero_grad_buffer()

    def after_backward(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.ddp.finish_grad_sync()
        for param in params:
            main_grad = getattr(param, "main_grad", None)
            if main_grad is None:
                raise RuntimeError(f"parameter {tuple(param.shape)} has no main_grad: it is not in megatron's DDP")
            param.grad = main_grad if main_grad.dtype == param.dtype else main_grad.to(param.dtype)


__all__ = ["ENGINES", "DataParallelConfig", "MegatronGradSync", "ddp_config"]
