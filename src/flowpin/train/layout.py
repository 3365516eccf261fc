"""The parallel layout of a training run (recipe ``train.layout``) and what it implies for a world size.

A layout says how the GPUs of a launch split the model and the batch, in megatron-core's terms:

* ``tensor`` (TP): each layer's weight matrices split across this many GPUs (megatron's column/row parallel
  linears; attention heads and key/value groups divide among them);
* ``pipeline`` (PP): the layers split into this many consecutive stages, micro-batches flowing through them
  under the 1F1B schedule; ``virtual_pipeline``: each stage holds this many non-adjacent chunks of layers
  (megatron's interleaved schedule: a smaller pipeline bubble for more point-to-point traffic);
* ``sequence_parallel`` (SP, with TP): the activations outside the tensor-parallel regions (norms, dropout,
  residuals) split along the sequence too, all-reduces becoming all-gathers and reduce-scatters;
* ``context`` (CP): each sequence split along its tokens across this many GPUs (ring attention);
* ``expert`` (EP): mixture-of-experts layers split across GPUs; refused, the model has no experts;
* ``micro_batch_size`` and ``recompute``: how many sequences one forward/backward holds at a time, and
  which activations are recomputed in the backward pass instead of stored.

Data parallelism is what is left: ``data = world / (tensor x pipeline x context)``, and the recipe's global
batch (``train.loop.batch_size``) must split into ``micro_batch_size x accumulation x data``
(:func:`derive_layout`, :class:`DerivedLayout`). The defaults are today's engine: one GPU per model replica,
the whole per-rank batch in one micro-batch, nothing recomputed.

``flowpin plan`` (:mod:`flowpin.train.plan`) plans any valid layout; the training engine trains only the
default one until issue 16 lands (:func:`flowpin.train.pretrain.refuse_untrained_layout` refuses the rest
before anything is written). Torch-free: values in, values out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flowpin.errors import RecipeError
from flowpin.recipe import check_choice, check_int

RECOMPUTE = ("none", "selective", "full")
"""``train.layout.recompute``: store every activation; recompute core attention (megatron's ``selective``:
the attention scores and softmax); recompute whole layers from their stored inputs (``full``)."""
_MAX_PARALLEL = 1 << 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayoutConfig:
    """How a launch splits the model and the batch across GPUs (keys ``train.layout.*``; see the module
    docstring). The defaults are the layout the engine trains today: data parallel only."""

    tensor: int = 1
    """Tensor-parallel size: GPUs sharing each layer's weights (must divide attention heads and KV groups)."""
    pipeline: int = 1
    """Pipeline-parallel size: consecutive stages the layers are split into (must divide the layer count)."""
    virtual_pipeline: int | None = None
    """Layer chunks per pipeline stage (megatron's interleaved 1F1B); ``null``: one chunk, plain 1F1B."""
    sequence_parallel: bool = False
    """Split the activations outside tensor-parallel regions along the sequence too (needs ``tensor`` > 1)."""
    context: int = 1
    """Context-parallel size: GPUs sharing each sequence's tokens (ring attention)."""
    expert: int = 1
    """Expert-parallel size; only 1: the model has no mixture-of-experts layers."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one data-parallel rank; ``null``: the whole per-rank batch at once
    (no gradient accumulation), as the engine trains today."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``selective`` (core attention) or ``full`` (whole layers)."""

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context", "expert"):
            check_int(getattr(self, name), f"train.layout.{name}", minimum=1, maximum=_MAX_PARALLEL)
        if self.expert != 1:
            raise RecipeError(
                f"train.layout.expert: {self.expert}: expert parallelism splits mixture-of-experts layers, and "
                "this model has none (dense SwiGLU MLPs); set train.layout.expert=1"
            )
        if self.virtual_pipeline is not None:
            check_int(self.virtual_pipeline, "train.layout.virtual_pipeline", minimum=2, maximum=_MAX_PARALLEL)
            if self.pipeline < 2:
                raise RecipeError(
                    f"train.layout.virtual_pipeline: {self.virtual_pipeline} chunks per stage need a pipeline "
                    f"(train.layout.pipeline >= 2, here {self.pipeline}); set it to null or raise pipeline"
                )
        if not isinstance(self.sequence_parallel, bool):
            raise RecipeError(f"train.layout.sequence_parallel: {self.sequence_parallel!r} must be true or false")
        if self.sequence_parallel and self.tensor < 2:
            raise RecipeError(
                "train.layout.sequence_parallel: sequence parallelism splits the tensor-parallel group's "
                f"activations, and train.layout.tensor is {self.tensor}; set it to false or tensor >= 2"
            )
        if self.micro_batch_size is not None:
            check_int(self.micro_batch_size, "train.layout.micro_batch_size", minimum=1, maximum=1 << 24)
        check_choice(self.recompute, RECOMPUTE, "train.layout.recompute")

    @property
    def model_parallel(self) -> int:
        """GPUs one model replica spans: ``tensor x pipeline x context``."""
        return self.tensor * self.pipeline * self.context


@dataclasses.dataclass(frozen=True, kw_only=True)
class DerivedLayout:
    """A layout resolved for one launch: every parallel size, data parallel included, and the micro-batching
    (``global batch = micro_batch_size x accumulation x data``)."""

    tensor: int
    pipeline: int
    virtual_pipeline: int | None
    context: int
    data: int
    """Data-parallel size: ``world / (tensor x pipeline x context)``."""
    micro_batch_size: int
    """Sequences per forward/backward on one data-parallel rank."""
    accumulation: int
    """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation)."""
    sequence_parallel: bool
    recompute: str

    @property
    def world_size(self) -> int:
        """GPUs of the launch: ``tensor x pipeline x context x data``."""
        return self.tensor * self.pipeline * self.context * self.data

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values, for manifests and reports."""
        return dataclasses.asdict(self)


def derive_layout(layout: LayoutConfig, *, world_size: int, global_batch: int) -> DerivedLayout:
    """Resolve ``layout`` for a launch of ``world_size`` GPUs training ``global_batch`` sequences per step.

    Raises :class:`RecipeError` naming the numbers and the fix when the world does not split into model
    replicas, or the global batch not into micro-batches across them.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise RecipeError(f"world size: {world_size!r} must be a positive number of GPUs (processes) of the launch")
    check_int(global_batch, "train.loop.batch_size", minimum=1)
    replica = layout.model_parallel
    if world_size % replica:
        raise RecipeError(
            f"train.layout: a model replica spans tensor {layout.tensor} x pipeline {layout.pipeline} x context "
            f"{layout.context} = {replica} GPUs, which does not divide the world size {world_size}; launch a "
            f"multiple of {replica} GPUs or change train.layout"
        )
    data = world_size // replica
    if global_batch % data:
        raise RecipeError(
            f"train.loop.batch_size: {global_batch} sequences do not split across {data} data-parallel ranks "
            f"({world_size} GPUs / {replica} per replica); make the global batch a multiple of {data}"
        )
    per_rank = global_batch // data
    micro = per_rank if layout.micro_batch_size is None else layout.micro_batch_size
    if per_rank % micro:
        raise RecipeError(
            f"train.layout.micro_batch_size: {micro} does not divide the {per_rank} sequences each data-parallel "
            f"rank trains per step (train.loop.batch_size {global_batch} / {data} ranks); the global batch must "
            f"be micro_batch_size x accumulation x {data}: choose a divisor of {per_rank}"
        )
    return DerivedLayout(
        tensor=layout.tensor,
        pipeline=layout.pipeline,
        virtual_pipeline=layout.virtual_pipeline,
        context=layout.context,
        data=data,
        micro_batch_size=micro,
        accumulation=per_rank // micro,
        sequence_parallel=layout.sequence_parallel,
        recompute=layout.recompute,
    )


__all__ = ["RECOMPUTE", "DerivedLayout", "LayoutConfig", "derive_layout"]
