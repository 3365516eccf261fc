"""``flowpin plan``: per-GPU memory and per-step communication of a training launch, before it is launched.

Pure arithmetic (no tensors, no torch import here) from the recipe's model (:class:`~flowpin.train.transformer.
ModelConfig`, parameters counted by :func:`~flowpin.train.transformer.estimate_params`), its ``train`` block
(:class:`~flowpin.train.pretrain.TrainingStageConfig`: global batch, gradient engine, distributed optimizer,
``train.layout``), the sequence length, a GPU count and the GPU memory. :func:`plan_memory` returns a
:class:`Plan`; :func:`check_fits` raises :class:`~flowpin.errors.PlanError` with its numbers when it does not
fit; :func:`render_plan` is the terminal table; :func:`plan_recipe` composes ``params/<recipe>.yaml`` with
overrides first.

What it plans is megatron-core's mixed-precision training, the engine issue 16 builds (today's engine trains
the default layout only, and in bf16 steps AdamW on the bf16 parameters themselves; see docs/parallel.md):

* **weights**: the parameters of the worst pipeline stage in ``model.dtype`` (bf16: 2 bytes, fp32: 4;
  ``model.precision.fp8_param``: 1 byte for the linear layers' weights). Tensor parallelism splits every
  linear layer and the (vocab-parallel) embedding and output layer; norms are replicated. Stage 0 holds the
  embedding, the last stage the output layer and final norm.
* **main weights**: an fp32 copy of every parameter when the model trains in bf16 (megatron's mixed
  precision: the optimizer updates fp32 main weights, then casts them back); none in fp32.
* **gradients**: the grad buffer, fp32 with megatron's DDP and ``grad_reduce_in_fp32``, else the parameter
  dtype. Never sharded (the distributed optimizer reduce-scatters into the full buffer).
* **optimizer**: Adam's two fp32 moments (8 bytes per parameter). With
  ``train.data_parallel.use_distributed_optimizer`` the moments *and* the main weights are sharded across the
  data-parallel x context-parallel ranks (megatron's distributed optimizer: ZeRO-1).
* **activations**, after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv 2205.05198), Section 4: per layer and micro-batch ``s·b·h·(34 + 5·a·s/h)`` bytes at 16 bits,
  of which ``10·s·b·h`` lies outside the tensor-parallel regions (norm inputs, the QKV and MLP inputs, dropout
  masks: divided by ``t`` only with sequence parallelism) and the rest is divided by ``t``. Adapted to this
  model, term by term (:func:`layer_activation_bytes`): grouped-query attention stores K and V at
  ``groups x head_dim`` width; QK-norm stores its inputs; SwiGLU stores the fused gate/up output (``2·ffn``)
  and the down projection's input (``ffn``) instead of GeLU's ``4h + 4h``; dropout masks only when
  ``model.dropout > 0``; the ``5·a·s²·b`` score term (softmax output, dropout mask and output) is what
  ``selective`` recompute drops; ``full`` recompute keeps each layer's input (``2·s·b·h``) plus one layer's
  full activations while that layer is recomputed. Context parallelism divides the tokens per GPU by
  ``c``. Activations are stored at the parameter width (2 bytes bf16, 4 bytes fp32; FP8 GEMM inputs are
  counted at 16 bits). Pipeline stage 0 holds ``min(m, p)`` micro-batches in flight under 1F1B (``m``
  micro-batches per step, ``p`` stages), ``min(m, p + (p-1)/v)`` with ``v`` virtual stages (Korthikanti's
  interleaving factor ``1 + (p-1)/(p·v)``); the last stage holds one, plus the logits.
* **logits**: ``s·b·vocab/t`` fp32 logits of one micro-batch (vocab-parallel cross entropy), plus the 16-bit
  logits they are cast from in bf16, and the final norm's and output layer's inputs.

Approximated, and why the margin (:data:`MEMORY_MARGIN`) exists: attention over a sliding window is counted
as full attention (megatron's unfused attention masks a full score matrix; fused/flash attention stores no
score matrix at all: plan ``selective`` for it); the CUDA context, NCCL buffers, allocator fragmentation,
temporary buffers of the optimizer step and megatron's global memory buffer are not modelled one by one.

**Communication** per optimizer step, bytes each GPU sends (ring algorithms: an all-reduce of ``X`` bytes
over ``n`` ranks sends ``2·(n-1)/n·X``, a reduce-scatter or all-gather ``(n-1)/n·X``): data parallel
(gradient all-reduce over the data x context ranks, or with the distributed optimizer a reduce-scatter of the
grad buffer plus an all-gather of the updated parameters); tensor parallel (two all-reduces per layer forward
and two backward, or with sequence parallelism the same volume as all-gathers and reduce-scatters; a full
recompute repeats the forward ones); context parallel (ring attention passes K and V ``c-1`` times forward,
K, V and their gradients backward); pipeline (each micro-batch's activations forward and gradients backward,
per virtual stage).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowpin.errors import InternalError, PlanError, RecipeError
from flowpin.train.layout import DerivedLayout, derive_layout

if TYPE_CHECKING:
    from flowpin.train.pretrain import TrainingStageConfig
    from flowpin.train.transformer import ModelConfig

MEMORY_MARGIN = 0.10
"""Fraction of each GPU's memory the plan leaves free: the CUDA context and NCCL buffers (~1-2 GiB), allocator
fragmentation and the step's temporary buffers, none of which the plan counts one by one."""
ADAM_MOMENT_BYTES = 8
"""Adam's first and second moments, fp32 each, per parameter."""
MAIN_WEIGHT_BYTES = 4
"""megatron's fp32 main weights, per parameter, when the model trains in 16 bits."""
LOGIT_BYTES = 4
"""The cross entropy's fp32 logits, per vocabulary entry and token."""
GiB = 1 << 30

_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Communication:
    """Bytes one GPU sends per optimizer step, by parallel dimension (see the module docstring)."""

    data_parallel: int
    """Gradient all-reduce, or the distributed optimizer's reduce-scatter plus parameter all-gather."""
    tensor_parallel: int
    """The tensor-parallel all-reduces (or sequence-parallel all-gathers and reduce-scatters) of every layer."""
    context_parallel: int
    """Ring attention's K/V (and their gradients) passed around the context-parallel ranks."""
    pipeline: int
    """Activations forward and gradients backward between pipeline stages."""

    @property
    def total(self) -> int:
        return self.data_parallel + self.tensor_parallel + self.context_parallel + self.pipeline


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Per-GPU memory (the worst pipeline stage) and per-step communication of one launch."""

    parameters: int
    """Parameters of the whole model (:func:`~flowpin.train.transformer.estimate_params`)."""
    layout: DerivedLayout
    """The layout resolved for the launch (data-parallel size, micro-batches)."""
    sequence_length: int
    """Tokens per sequence planned for."""
    dtype: str
    """``model.dtype``: the parameter and activation width."""
    grad_dtype: str
    """The grad buffer's dtype."""
    distributed_optimizer: bool
    """Main weights and optimizer state sharded across the data x context ranks."""
    stage: str
    """Which pipeline stage the numbers are for: ``only`` (no pipeline), ``first`` or ``last``."""
    stage_parameters: int
    """Parameters held by one GPU of that stage."""
    in_flight: float
    """Micro-batches whose activations that stage holds at once."""
    weights: int
    main_weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    communication: Communication

    @property
    def states(self) -> int:
        """Weights, main weights, gradients and optimizer state: the bytes per GPU before any activation."""
        return self.weights + self.main_weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """Bytes per GPU the plan counts (before the margin)."""
        return self.states + self.activations + self.logits

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (bytes as integers), for reports."""
        plain = dataclasses.asdict(self)
        plain["states"] = self.states
        plain["total"] = self.total
        plain["communication"]["total"] = self.communication.total
        return plain


def usable_bytes(gpu_memory: int) -> int:
    """What a GPU of ``gpu_memory`` bytes leaves for the plan after :data:`MEMORY_MARGIN`."""
    return int(gpu_memory * (1 - MEMORY_MARGIN))


def parse_memory(text: str) -> int:
    """``80GiB``, ``80GB``, ``141 GB``, ``8e10`` -> bytes (GB = 10^9, GiB = 2^30); ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([KMGT]i?B|B)?\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a memory size (e.g. 80GiB, 80GB, 141GB)")
    number, unit = float(match.group(1)), (match.group(2) or "B")
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "i" in unit else 1000
    value = int(number * base**power)
    if value < 1:
        raise ValueError(f"{text!r}: a GPU needs some memory")
    return value


# --- the model's shapes ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Shapes:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_width: int
    """``num_query_groups x head_dim``: the width of K and of V."""
    vocab: int
    """Padded vocabulary (embedding and output rows)."""
    qk_norm: bool
    dropout: bool
    layer_linear: int
    """Parameters of one layer's linear layers (split by tensor parallelism)."""
    layer_norms: int
    """Parameters of one layer's norms (replicated across tensor-parallel ranks)."""


def _shapes(model: ModelConfig) -> _Shapes:
    from flowpin.train.transformer import estimate_params

    h, d = model.hidden_size, model.head_dim
    vocab = model.padded_vocab_size
    per_layer, rest = divmod(estimate_params(model) - 2 * vocab * h - h, model.num_layers)
    if rest:
        raise InternalError("plan: estimate_params is not embeddings + layers + final norm")
    norms = 2 * h + (2 * d if model.qk_norm else 0)
    return _Shapes(
        layers=model.num_layers,
        hidden=h,
        ffn=model.ffn_hidden_size,
        heads=model.num_attention_heads,
        kv_width=model.num_query_groups * d,
        vocab=vocab,
        qk_norm=model.qk_norm,
        dropout=model.dropout > 0,
        layer_linear=per_layer - norms,
        layer_norms=norms,
    )


def layer_activation_bytes(
    model: ModelConfig,
    *,
    tokens: int,
    keys: int,
    micro_batch: int,
    tensor: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
) -> int:
    """Activation bytes one transformer layer stores for one micro-batch (Korthikanti et al. 2022, adapted:
    see the module docstring). ``tokens``: this GPU's tokens of each sequence (``s / context``); ``keys``:
    the keys each query attends over (``s``)."""
    sh = _shapes(model)
    width = _DTYPE_BYTES[model.dtype]
    sb = tokens * micro_batch
    h, kv, f = sh.hidden, sh.kv_width, sh.ffn
    mask = 1 if sh.dropout else 0
    # Outside the tensor-parallel regions: both norms' inputs, the QKV and MLP inputs (16-bit), dropout masks.
    outside = sb * (4 * h * width + 2 * mask * h)
    # Inside: Q and K (and QK-norm's inputs), V, the attention output projection's input, SwiGLU's fused
    # gate/up output and the down projection's input.
    qk = (h + kv) * (2 if sh.qk_norm else 1)
    inside = sb * width * (qk + kv + h + 3 * f)
    # Attention scores: softmax output, and with dropout its mask and output (Korthikanti's 5·a·s²·b).
    scores = sh.heads * tokens * keys * micro_batch * (width + mask * (1 + width))
    inside_split = inside // tensor + scores // tensor
    outside_split = outside // tensor if sequence_parallel else outside
    if recompute == "none":
        return outside_split + inside_split
    if recompute == "selective":
        return outside_split + inside // tensor
    layer_input = sb * h * width
    return layer_input // tensor if sequence_parallel else layer_input


# --- the plan ----------------------------------------------------------------------------------------


def plan_memory(
    model: ModelConfig,
    train: TrainingStageConfig,
    *,
    gpus: int,
    sequence_length: int | None = None,
    distributed_optimizer: bool | None = None,
) -> Plan:
    """The :class:`Plan` of training ``model`` under ``train`` on ``gpus`` GPUs (see the module docstring).

    ``sequence_length`` defaults to ``model.max_sequence_length``; ``distributed_optimizer`` to
    ``train.data_parallel.use_distributed_optimizer``. Raises :class:`RecipeError` for a layout the model
    cannot be split into (naming the key and the numbers).
    """
    layout = derive_layout(train.layout, world_size=gpus, global_batch=train.loop.batch_size)
    sh = _shapes(model)
    s = model.max_sequence_length if sequence_length is None else sequence_length
    dp_cfg = train.data_parallel
    dist_opt = dp_cfg.use_distributed_optimizer if distributed_optimizer is None else distributed_optimizer
    _check_splits(model, layout, s, dist_opt=dist_opt, engine=dp_cfg.engine)
    t, p, c = layout.tensor, layout.pipeline, layout.context
    v = layout.virtual_pipeline or 1
    m, b = layout.accumulation, layout.micro_batch_size
    width = _DTYPE_BYTES[model.dtype]
    grad_dtype = "fp32" if dp_cfg.engine == "megatron" and dp_cfg.grad_reduce_in_fp32 else model.dtype
    grad_width = _DTYPE_BYTES[grad_dtype]
    linear_width = 1 if model.precision.fp8_param else width
    tokens = s // c
    stage_layers = sh.layers // p
    layer_act = layer_activation_bytes(
        model,
        tokens=tokens,
        keys=s,
        micro_batch=b,
        tensor=t,
        sequence_parallel=layout.sequence_parallel,
        recompute=layout.recompute,
    )
    working = 0  # full recompute: one layer's whole activations while it is recomputed
    if layout.recompute == "full":
        working = layer_activation_bytes(
            model, tokens=tokens, keys=s, micro_batch=b, tensor=t, sequence_parallel=layout.sequence_parallel
        )
    hidden_out = tokens * b * sh.hidden * width // (t if layout.sequence_parallel else 1)
    logits = tokens * b * (sh.vocab // t) * (LOGIT_BYTES + (width if width != LOGIT_BYTES else 0))
    logits += 2 * hidden_out  # the final norm's and the output layer's inputs

    first_flight = min(float(m), p + (p - 1) / v if layout.virtual_pipeline else float(p)) if p > 1 else 1.0
    stages = ["only"] if p == 1 else ["first", "last"]
    candidates = []
    for stage in stages:
        embedding = sh.vocab * sh.hidden // t * (2 if stage == "only" else 1)
        norms = stage_layers * sh.layer_norms + (sh.hidden if stage != "first" else 0)
        linear = stage_layers * sh.layer_linear // t
        params = linear + norms + embedding
        weights = linear * linear_width + (norms + embedding) * width
        shards = layout.data * c if dist_opt else 1
        main = -(-params * MAIN_WEIGHT_BYTES // shards) if model.dtype != "fp32" else 0
        optimizer = -(-params * ADAM_MOMENT_BYTES // shards)
        flight = first_flight if stage == "first" else 1.0
        activations = int(flight * stage_layers * layer_act) + working
        stage_logits = logits if stage != "first" else 0
        candidates.append(
            (
                weights + main + params * grad_width + optimizer + activations + stage_logits,
                stage,
                params,
                flight,
                weights,
                main,
                params * grad_width,
                optimizer,
                activations,
                stage_logits,
            )
        )
    _, stage, params, flight, weights, main, grads, optimizer, activations, stage_logits = max(candidates)
    comm = _communication(
        model,
        layout,
        s=s,
        stage_params=params,
        width=width,
        grad_width=grad_width,
        dist_opt=dist_opt,
        stage_layers=stage_layers,
    )
    return Plan(
        parameters=_total_params(model),
        layout=layout,
        sequence_length=s,
        dtype=model.dtype,
        grad_dtype=grad_dtype,
        distributed_optimizer=dist_opt,
        stage=stage,
        stage_parameters=params,
        in_flight=flight,
        weights=weights,
        main_weights=main,
        gradients=grads,
        optimizer=optimizer,
        activations=activations,
        logits=stage_logits,
        communication=comm,
    )


def _total_params(model: ModelConfig) -> int:
    from flowpin.train.transformer import estimate_params

    return estimate_params(model)


def _check_splits(model: ModelConfig, layout: DerivedLayout, s: int, *, dist_opt: bool, engine: str) -> None:
    t, p, c = layout.tensor, layout.pipeline, layout.context
    chunks = p * (layout.virtual_pipeline or 1)
    for what, value in (
        ("model.num_attention_heads", model.num_attention_heads),
        ("model.num_query_groups", model.num_query_groups),
        ("model.ffn_hidden_size", model.ffn_hidden_size),
    ):
        if value % t:
            raise RecipeError(
                f"train.layout.tensor: {t} does not divide {what} ({value}): each tensor-parallel rank needs whole "
                "heads, key/value groups and MLP columns; choose a divisor"
            )
    if model.num_layers % chunks:
        raise RecipeError(
            f"train.layout.pipeline: {model.num_layers} layers do not split into {p} stages x "
            f"{layout.virtual_pipeline or 1} virtual chunks ({chunks}); choose sizes whose product divides the "
            "layer count"
        )
    if layout.sequence_parallel and s % t:
        raise RecipeError(
            f"train.layout.sequence_parallel: the sequence length {s} does not divide by tensor {t}; sequence "
            "parallelism splits every sequence into equal parts"
        )
    if c > 1 and s % (2 * c):
        raise RecipeError(
            f"train.layout.context: the sequence length {s} does not divide into 2 x {c} chunks (megatron's "
            "load-balanced context parallelism); choose a context size whose double divides it"
        )
    if dist_opt and engine != "megatron":
        raise RecipeError(
            "train.data_parallel.use_distributed_optimizer: megatron's distributed optimizer needs "
            "train.data_parallel.engine=megatron"
        )


def _communication(
    model: ModelConfig,
    layout: DerivedLayout,
    *,
    s: int,
    stage_params: int,
    width: int,
    grad_width: int,
    dist_opt: bool,
    stage_layers: int,
) -> Communication:
    t, p, c = layout.tensor, layout.pipeline, layout.context
    m, b = layout.accumulation, layout.micro_batch_size
    tokens = s // c
    n = layout.data * c  # gradients are reduced across data x context ranks
    share = (n - 1) / n
    grads = stage_params * grad_width
    dp = share * (grads + stage_params * width) if dist_opt else 2 * share * grads  # RS + AG, or all-reduce
    activation = tokens * b * model.hidden_size * width
    # Forward: 2 all-reduces per layer (attention, MLP), backward: 2; a full recompute repeats the forward's.
    collectives = 4 + (2 if layout.recompute == "full" else 0)
    tp = collectives * 2 * (t - 1) / t * activation * stage_layers * m if t > 1 else 0.0
    kv_chunk = 2 * tokens * b * model.num_query_groups * model.head_dim // t * width
    passes = 3 + (1 if layout.recompute == "full" else 0)  # fwd K,V; bwd K,V and dK,dV (+ recomputed fwd)
    cp = passes * (c - 1) * kv_chunk * stage_layers * m
    pp_size = activation // t if layout.sequence_parallel else activation
    pp = 2 * m * (layout.virtual_pipeline or 1) * pp_size if p > 1 else 0
    return Communication(data_parallel=int(dp), tensor_parallel=int(tp), context_parallel=int(cp), pipeline=int(pp))


def check_fits(plan: Plan, gpu_memory: int) -> None:
    """Raise :class:`PlanError` with the plan's numbers when it needs more than ``gpu_memory`` less the
    :data:`MEMORY_MARGIN`."""
    usable = usable_bytes(gpu_memory)
    if plan.total <= usable:
        return
    parts = ", ".join(f"{name} {_gib(value)}" for name, value in _memory_rows(plan))
    lay = plan.layout
    raise PlanError(
        f"the plan needs {_gib(plan.total)} GiB per GPU ({plan.stage} pipeline stage: {parts} GiB; "
        f"{_gib(plan.states)} GiB ({plan.states / 1e9:.1f} GB) before activations) but "
        f"{_gib(gpu_memory)} GiB GPUs leave {_gib(usable)} GiB after the {MEMORY_MARGIN:.0%} margin; at "
        f"{lay.world_size} GPUs (tensor {lay.tensor}, pipeline {lay.pipeline}, context {lay.context}, data "
        f"{lay.data}) shard the optimizer (train.data_parallel.use_distributed_optimizer, engine megatron), split "
        "the model (train.layout.tensor, pipeline, context), shrink micro-batches (train.layout.micro_batch_size)"
        ", recompute activations (train.layout.recompute), or plan more or larger GPUs (--gpus, --gpu-memory)"
    )


def _gib(value: float) -> str:
    gib = value / GiB
    return f"{gib:.1f}" if gib >= 1 or gib == 0 else f"{gib:.3g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.2f}M"


def _memory_rows(plan: Plan) -> list[tuple[str, int]]:
    return [
        ("weights", plan.weights),
        ("main weights", plan.main_weights),
        ("gradients", plan.gradients),
        ("optimizer", plan.optimizer),
        ("activations", plan.activations),
        ("logits", plan.logits),
    ]


def render_plan(plan: Plan, gpu_memory: int) -> str:
    """The plan as a terminal table in GiB, ending with whether it fits ``gpu_memory``."""
    lay = plan.layout
    sharded = f"/ {lay.data * lay.context} (distributed optimizer)" if plan.distributed_optimizer else "not sharded"
    sp = ", sequence parallel" if lay.sequence_parallel else ""
    vp = f" x {lay.virtual_pipeline} virtual" if lay.virtual_pipeline else ""
    notes = {
        "weights": f"{plan.dtype}, {_count(plan.stage_parameters)} parameters on this GPU",
        "main weights": f"fp32, {sharded}" if plan.main_weights else f"none ({plan.dtype} weights are the main ones)",
        "gradients": f"{plan.grad_dtype} grad buffer, not sharded",
        "optimizer": f"Adam: 2 x fp32, {sharded}",
        "activations": f"recompute {lay.recompute}, {plan.in_flight:g} micro-batch(es) in flight",
        "logits": "fp32 cross entropy" if plan.logits else "none on this stage",
    }
    usable = usable_bytes(gpu_memory)
    verdict = "fits" if plan.total <= usable else "DOES NOT FIT"
    lines = [
        f"plan: {_count(plan.parameters)} parameters, {lay.world_size} GPUs of {_gib(gpu_memory)} GiB, "
        f"sequence {plan.sequence_length}",
        f"layout: tensor {lay.tensor}{sp}, pipeline {lay.pipeline}{vp}, context {lay.context}, data {lay.data}; "
        f"micro-batch {lay.micro_batch_size} x {lay.accumulation} accumulation x {lay.data} ranks = "
        f"{lay.micro_batch_size * lay.accumulation * lay.data} sequences per step",
        "",
        f"{'memory per GPU (' + plan.stage + ' pipeline stage)':<40} {'GiB':>8}",
    ]
    for name, value in _memory_rows(plan):
        lines.append(f"  {name:<38} {_gib(value):>8}  {notes[name]}")
    lines += [
        f"  {'before activations':<38} {_gib(plan.states):>8}  {plan.states / 1e9:.1f} GB",
        f"  {'total':<38} {_gib(plan.total):>8}",
        f"  {f'usable ({MEMORY_MARGIN:.0%} margin)':<38} {_gib(usable):>8}  {verdict}",
        "",
        f"{'communication per step, sent per GPU':<40} {'GiB':>8}",
    ]
    comm = plan.communication
    dp_what = "reduce-scatter + all-gather" if plan.distributed_optimizer else "gradient all-reduce"
    for name, value, what in (
        ("data parallel", comm.data_parallel, dp_what),
        ("tensor parallel", comm.tensor_parallel, "all-gather/reduce-scatter" if sp else "all-reduce"),
        ("context parallel", comm.context_parallel, "ring attention K/V"),
        ("pipeline", comm.pipeline, "point-to-point"),
    ):
        lines.append(f"  {name:<38} {_gib(value):>8}  {what}")
    lines.append(f"  {'total':<38} {_gib(comm.total):>8}")
    return "\n".join(lines)


# --- from a recipe -----------------------------------------------------------------------------------


def plan_recipe(config_dir: Path, recipe: str, overrides: Sequence[str], *, gpus: int) -> Plan:
    """Compose ``config_dir/<recipe>.yaml`` with ``overrides`` (Hydra, onto the recipe schemas) and plan it.

    The recipe must hold a ``model`` group and a ``train`` block (pretrain, midtrain, long context, the
    multinode and paper-scale recipes). The planner plans any valid layout and optimizer; the training engine
    refuses what it does not train yet (:func:`flowpin.train.pretrain.refuse_untrained_layout`).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from flowpin.recipe import to_config
    from flowpin.recipe_schema import compose_recipe
    from flowpin.train.pretrain import TrainingStageConfig
    from flowpin.train.transformer import ModelConfig

    if not (config_dir / f"{recipe}.yaml").is_file():
        raise RecipeError(f"{config_dir / recipe}.yaml: no such recipe; name one of params/*.yaml (without .yaml)")
    cfg = compose_recipe(config_dir, recipe, overrides)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{recipe}: {' '.join(overrides) or 'recipe'} does not resolve: {exc}") from exc
    if not isinstance(plain, dict) or not isinstance(plain.get("train"), dict) or "model" not in plain:
        raise RecipeError(
            f"params/{recipe}.yaml: no train block and model group; flowpin plan plans pretraining-style recipes "
            "(pretrain, midtrain, longctx, pretrain_multinode, pretrain_olmo3_*)"
        )
    model = to_config(ModelConfig, plain["model"], where="model")
    train = to_config(TrainingStageConfig, plain["train"], where="train")
    return plan_memory(model, train, gpus=gpus)


__all__ = [
    "ADAM_MOMENT_BYTES",
    "MAIN_WEIGHT_BYTES",
    "MEMORY_MARGIN",
    "Communication",
    "Plan",
    "check_fits",
    "layer_activation_bytes",
    "parse_memory",
    "plan_memory",
    "plan_recipe",
    "render_plan",
    "usable_bytes",
]
