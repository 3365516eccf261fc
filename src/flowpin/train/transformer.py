"""The flow's model: an OLMo-3-style decoder-only transformer, built with megatron-core.

This module owns :class:`ModelConfig` (the ``model`` recipe group, ``params/model/*.yaml``), its mapping
to megatron's ``TransformerConfig`` (:func:`to_transformer_config`), the per-layer layout (which layers use
sliding-window attention, which get YaRN: :func:`layer_layout`), :func:`build_model`, parameter counts,
and the precision rules (:func:`check_precision` refuses FP8 that could not really be used;
:func:`effective_precision` reads what a built model actually uses, for the manifest).

Importing it has no side effects and does not import megatron (which imports Transformer Engine, and so
initialises CUDA, on a GPU machine). :func:`build_model` needs the process group and megatron's parallel
state, and on CPU the :mod:`flowpin.train.megatron_cpu` patches: :func:`flowpin.train.distributed.init_distributed`
sets up all three.

How the OLMo 3 architecture maps onto megatron-core 0.16.1:

* GQA ``num_query_groups``; SwiGLU ``gated_linear_unit=True`` + ``F.silu``; RMSNorm; no biases; RoPE.
* **QK-norm** is megatron's ``qk_layernorm``: an RMSNorm *per head* (``head_dim`` weights shared by all
  heads), where OLMo normalises the full query/key projections. Megatron's layer is pre-norm; OLMo's
  "reordered" norm (norm after each sublayer, before the residual add) would need a custom layer spec.
* **Sliding window.** ``sliding_window = W`` lets a query see ``W`` keys, its own position included (as
  HF ``sliding_window``): megatron ``window_size=(W-1, 0)`` (query ``i`` sees keys ``i-W+1 .. i``). Which
  layers: with an integer ``window_attn_skip_freq=N`` megatron makes every layer whose 1-based number is a
  multiple of ``N`` full, so the last layer is full only when ``num_layers % N == 0``. We always pass the
  explicit per-layer list instead (``1`` = windowed): every ``full_attention_every``-th layer *and* the
  last layer are full, for any depth (OLMo 3 7B/32B: layers 4, 8, ..., 32/64 are full).
* **YaRN on full-attention layers only.** Megatron applies rotary embeddings model-wide: ``GPTModel``
  computes one embedding and hands the same tensor to every layer, and with
  ``position_embedding_type="yarn"`` every layer's attention also reads the YaRN attention scaling
  (``mscale``) from ``yarn_*`` attributes on the shared config (found with ``hasattr``: setting them on
  the shared config would scale *every* layer, even under plain RoPE). That cannot express OLMo's
  recipe, so the model keeps model-wide plain RoPE and the layers chosen by ``yarn.apply_to`` are built
  as :func:`yarn_self_attention_class` attention: it replaces the RoPE frequencies it is handed by
  megatron's own ``YarnRotaryEmbedding`` ones (same sequence length) and carries a private copy of the
  config with the ``yarn_*`` attributes, so the mscale applies to that layer alone. With
  ``apply_to: all`` this is exactly megatron's native ``position_embedding_type="yarn"`` (tested bitwise).
  No weights are added: a pretraining checkpoint loads into the long-context model unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flowpin.environment import probe_transformer_engine
from flowpin.errors import FlowpinError, InternalError, PrecisionError, RecipeError
from flowpin.recipe import check_choice, check_float, check_int

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel  # type: ignore[import-untyped,unused-ignore]
    from megatron.core.transformer import TransformerConfig  # type: ignore[import-untyped,unused-ignore]

DEVICES = ("cpu", "cuda")
"""Devices :func:`build_model` knows."""
DTYPES: Mapping[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``model.dtype`` values and the parameter/compute dtype each means."""
FP8_FORMATS = ("e4m3", "hybrid")
"""``model.precision.fp8``: ``e4m3`` everywhere, or ``hybrid`` (e4m3 forward, e5m2 gradients)."""
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
"""``model.precision.fp8_recipe`` (Transformer Engine scaling recipes megatron exposes; ``mxfp8`` needs
Blackwell)."""
FP8_AMAX_ALGOS = ("most_recent", "max")
"""``model.precision.fp8_amax_compute_algo``."""
YARN_TARGETS = ("full_attention", "all")
"""``model.yarn.apply_to``: OLMo 3 scales the full-attention layers only; ``all`` is megatron's native YaRN."""
_MAX_DIM = 1 << 20
_MAX_SEQ = 1 << 24


# --- config ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class YarnConfig:
    """YaRN RoPE scaling for the long-context stage (``model.yarn``); parameters as in megatron-core's
    ``YarnRotaryEmbedding`` / the YaRN paper."""

    scale_factor: float
    """Context extension factor ``s`` (OLMo 3: 65536 / 8192 = 8). 1.0 leaves RoPE unchanged."""
    original_max_position: int
    """Context length the model was pretrained with (OLMo 3: 8192)."""
    beta_fast: float = 32.0
    """Rotations above which a frequency is kept as is (extrapolated)."""
    beta_slow: float = 1.0
    """Rotations below which a frequency is divided by ``scale_factor`` (interpolated); between the two
    the blend is linear."""
    mscale: float = 1.0
    """Attention (concentration) factor numerator: ``0.1 * mscale * ln(s) + 1``."""
    mscale_all_dim: float = 0.0
    """Attention factor denominator ``0.1 * mscale_all_dim * ln(s) + 1``; the defaults (1, 0) give the
    usual YaRN factor ``0.1 ln(s) + 1`` (1.2079 for s = 8, as OLMo 3's released config)."""
    apply_to: str = "full_attention"
    """Which layers get YaRN: ``full_attention`` (OLMo 3; sliding-window layers keep plain RoPE) or
    ``all``."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_float(self.scale_factor, f"{where}.scale_factor", minimum=1.0, maximum=1024.0)
        check_int(self.original_max_position, f"{where}.original_max_position", minimum=1, maximum=_MAX_SEQ)
        check_float(self.beta_fast, f"{where}.beta_fast", minimum=1e-6)
        check_float(self.beta_slow, f"{where}.beta_slow", minimum=1e-6)
        if not self.beta_fast > self.beta_slow:
            raise RecipeError(f"{where}.beta_fast: {self.beta_fast} must be greater than beta_slow ({self.beta_slow})")
        check_float(self.mscale, f"{where}.mscale", minimum=0.0)
        check_float(self.mscale_all_dim, f"{where}.mscale_all_dim", minimum=0.0)
        check_choice(self.apply_to, YARN_TARGETS, f"{where}.apply_to")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """FP8 training through Transformer Engine (``model.precision``); GPU only. Defaults are megatron's."""

    fp8: str | None = None
    """``null`` (no FP8), ``e4m3`` or ``hybrid``. Refused unless Transformer Engine is importable on a CUDA
    device: without it megatron silently ignores the setting (see :func:`check_precision`)."""
    fp8_recipe: str = "delayed"
    """Scaling recipe: ``delayed``, ``tensorwise``, ``mxfp8`` (Blackwell) or ``blockwise``."""
    fp8_margin: int = 0
    """Margin (power of two) for the scaling factor computation."""
    fp8_amax_history_len: int = 1
    """Length of the amax history window (delayed scaling)."""
    fp8_amax_compute_algo: str = "most_recent"
    """``most_recent`` or ``max`` (the largest amax in the history window)."""
    fp8_param: bool = False
    """Keep GEMM weights in FP8 (saves memory); needs ``fp8``."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if self.fp8 is not None:
            check_choice(self.fp8, FP8_FORMATS, f"{where}.fp8")
        check_choice(self.fp8_recipe, FP8_RECIPES, f"{where}.fp8_recipe")
        check_int(self.fp8_margin, f"{where}.fp8_margin", minimum=0, maximum=64)
        check_int(self.fp8_amax_history_len, f"{where}.fp8_amax_history_len", minimum=1, maximum=1 << 16)
        check_choice(self.fp8_amax_compute_algo, FP8_AMAX_ALGOS, f"{where}.fp8_amax_compute_algo")
        if not isinstance(self.fp8_param, bool):
            raise RecipeError(f"{where}.fp8_param: {self.fp8_param!r} must be true or false")
        if self.fp8_param and self.fp8 is None:
            raise RecipeError(f"{where}.fp8_param: FP8 parameters need {where}.fp8 (e4m3 or hybrid); set one or false")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model (``model`` recipe group): an OLMo-3-style decoder-only transformer. Validated on creation."""

    num_layers: int
    """Transformer layers (OLMo 3: 32 at 7B, 64 at 32B)."""
    hidden_size: int
    """Model width ``d_model`` (4096 / 5120)."""
    ffn_hidden_size: int
    """SwiGLU inner width (each of the gate and up projections has this many outputs)."""
    num_attention_heads: int
    """Query heads; must divide ``hidden_size`` (head dim = hidden_size / heads, even for RoPE)."""
    num_query_groups: int
    """Key/value heads (GQA); must divide ``num_attention_heads`` (= heads: plain multi-head attention)."""
    vocab_size: int
    """Tokenizer vocabulary size; normally replaced by the trained tokenizer's size (:meth:`with_vocab`)."""
    vocab_multiple: int = 128
    """Embedding rows are ``vocab_size`` rounded up to a multiple of this (OLMo: 100278 -> 100352); 1 = none."""
    max_sequence_length: int
    """Longest sequence the stage trains on (tokens)."""
    rotary_base: float = 10000.0
    """RoPE base (theta); OLMo 3 uses 500000."""
    sliding_window: int | None = None
    """Keys a query sees in sliding-window layers, its own position included (OLMo 3: 4096); ``null``
    makes every layer full attention."""
    full_attention_every: int = 4
    """With ``sliding_window``: every N-th layer (1-based N, 2N, ...) uses full attention, and so does the
    last layer always (OLMo 3: 3 of every 4 layers windowed). 1 makes every layer full."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (megatron: per head)."""
    normalization: str = "RMSNorm"
    """Layer normalization; only ``RMSNorm`` (OLMo 3)."""
    activation: str = "swiglu"
    """MLP activation; only ``swiglu`` (OLMo 3)."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (OLMo 3: 1e-6)."""
    yarn: YarnConfig | None = None
    """YaRN RoPE scaling (long-context stage), or ``null``."""
    init_method_std: float = 0.02
    """Std of the normal weight init (megatron scales it by 1/sqrt(2 * num_layers) for output projections)."""
    dropout: float = 0.0
    """Hidden and attention dropout (OLMo: 0). Nonzero dropout is still reproducible (seeded streams)."""
    dtype: str = "fp32"
    """Parameter and compute dtype: ``fp32`` (CPU runs) or ``bf16`` (GPU runs)."""
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    """FP8 through Transformer Engine (GPU only)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "model") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``model.num_query_groups`` ...)."""
        check_int(self.num_layers, f"{where}.num_layers", minimum=1, maximum=4096)
        check_int(self.hidden_size, f"{where}.hidden_size", minimum=2, maximum=_MAX_DIM)
        check_int(self.ffn_hidden_size, f"{where}.ffn_hidden_size", minimum=1, maximum=_MAX_DIM)
        check_int(self.num_attention_heads, f"{where}.num_attention_heads", minimum=1, maximum=_MAX_DIM)
        check_int(self.num_query_groups, f"{where}.num_query_groups", minimum=1, maximum=_MAX_DIM)
        if self.hidden_size % self.num_attention_heads:
            raise RecipeError(
                f"{where}.num_attention_heads: {self.num_attention_heads} must divide "
                f"{where}.hidden_size ({self.hidden_size})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise RecipeError(
                f"{where}.num_attention_heads: head dim {self.hidden_size // self.num_attention_heads} "
                f"(hidden_size / heads) must be even for RoPE"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise RecipeError(
                f"{where}.num_query_groups: {self.num_query_groups} must divide "
                f"{where}.num_attention_heads ({self.num_attention_heads})"
            )
        check_int(self.vocab_size, f"{where}.vocab_size", minimum=1, maximum=1 << 24)
        check_int(self.vocab_multiple, f"{where}.vocab_multiple", minimum=1, maximum=1 << 16)
        check_int(self.max_sequence_length, f"{where}.max_sequence_length", minimum=1, maximum=_MAX_SEQ)
        check_float(self.rotary_base, f"{where}.rotary_base", minimum=2.0)
        if self.sliding_window is not None:
            check_int(self.sliding_window, f"{where}.sliding_window", minimum=1, maximum=_MAX_SEQ)
        check_int(self.full_attention_every, f"{where}.full_attention_every", minimum=1, maximum=4096)
        if not isinstance(self.qk_norm, bool):
            raise RecipeError(f"{where}.qk_norm: {self.qk_norm!r} must be true or false")
        check_choice(self.normalization, ("RMSNorm",), f"{where}.normalization")
        check_choice(self.activation, ("swiglu",), f"{where}.activation")
        check_float(self.norm_eps, f"{where}.norm_eps", minimum=1e-12, maximum=1.0)
        if self.yarn is not None:
            self.yarn.validate(f"{where}.yarn")
        check_float(self.init_method_std, f"{where}.init_method_std", minimum=1e-8, maximum=10.0)
        check_float(self.dropout, f"{where}.dropout", minimum=0.0, maximum=0.99)
        check_choice(self.dtype, tuple(DTYPES), f"{where}.dtype")
        self.precision.validate(f"{where}.precision")

    @property
    def head_dim(self) -> int:
        """Channels per attention head (``hidden_size / num_attention_heads``)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Embedding / output rows: ``vocab_size`` rounded up to a multiple of ``vocab_multiple``."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        """This config with the tokenizer's vocabulary size (validated; the recipe value is a placeholder)."""
        return dataclasses.replace(self, vocab_size=vocab_size)


# --- layout ---------------------------------------------------------------------------------------------


def window_pattern(cfg: ModelConfig) -> tuple[bool, ...]:
    """Per layer (0-based), whether it uses sliding-window attention; the last layer never does."""
    if cfg.sliding_window is None:
        return (False,) * cfg.num_layers
    last = cfg.num_layers - 1
    return tuple((i + 1) % cfg.full_attention_every != 0 and i != last for i in range(cfg.num_layers))


def yarn_pattern(cfg: ModelConfig) -> tuple[bool, ...]:
    """Per layer (0-based), whether its rotary embedding is YaRN-scaled."""
    if cfg.yarn is None:
        return (False,) * cfg.num_layers
    if cfg.yarn.apply_to == "all":
        return (True,) * cfg.num_layers
    return tuple(not windowed for windowed in window_pattern(cfg))


def layer_layout(cfg: ModelConfig) -> list[dict[str, Any]]:
    """One entry per layer: ``attention`` (``sliding``/``full``), ``window`` (keys seen or ``None``) and
    ``rope`` (``rope``/``yarn``), for reports and manifests."""
    return [
        {
            "layer": i,
            "attention": "sliding" if windowed else "full",
            "window": cfg.sliding_window if windowed else None,
            "rope": "yarn" if yarn else "rope",
        }
        for i, (windowed, yarn) in enumerate(zip(window_pattern(cfg), yarn_pattern(cfg), strict=True))
    ]


# --- precision ------------------------------------------------------------------------------------------


def check_precision(cfg: ModelConfig, device: str, *, te_probe: Mapping[str, Any] | None = None) -> None:
    """Refuse, before anything is trained, a precision this process cannot really use.

    FP8 needs Transformer Engine importable on a CUDA device; megatron-core without TE accepts ``fp8=...``
    and trains in bf16/fp32 anyway, so a run would claim FP8 it never used. Raises :class:`RecipeError`
    naming ``model.precision.fp8``. ``te_probe`` is a :func:`flowpin.environment.probe_transformer_engine`
    result (probed here when needed and not given).
    """
    _check_device(device)
    fp8 = cfg.precision.fp8
    if fp8 is None:
        return
    if device != "cuda":
        raise PrecisionError(
            f"model.precision.fp8: {fp8!r} needs Transformer Engine on a CUDA device, but this run is on "
            f"{device}; megatron-core would silently train without FP8. Set model.precision.fp8=null "
            "(and model.dtype=fp32 on CPU), or run on a GPU with the gpu extra installed"
        )
    probe = probe_transformer_engine() if te_probe is None else te_probe
    if not probe.get("importable"):
        why = "is not installed" if not probe.get("installed") else f"cannot be imported ({probe.get('error')})"
        raise PrecisionError(
            f"model.precision.fp8: {fp8!r} needs Transformer Engine, which {why}; megatron-core would "
            "silently train without FP8. Install the gpu extra (pip install -e '.[gpu]') or set "
            "model.precision.fp8=null"
        )


def effective_precision(model: torch.nn.Module) -> dict[str, Any]:
    """What a built model really computes with, for the manifest (canonical-JSON values).

    Read from the model, not the recipe: the parameters' device and dtypes, the compute dtype, whether its
    layers are Transformer Engine modules, and the FP8 settings *only if* they are in force. A model whose
    config asks for FP8 but holds no Transformer Engine module raises :class:`FlowpinError` (megatron
    would have ignored FP8): a manifest never claims FP8 that was not used.
    """
    config: Any = model.config
    params = list(model.parameters())
    devices = sorted({p.device.type for p in params})
    te_modules = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__module__.startswith(("megatron.core.extensions.transformer_engine", "transformer_engine"))
        }
    )
    fp8 = config.fp8
    if fp8 is not None and not te_modules:
        raise PrecisionError(
            f"the model's config asks for fp8={fp8!r} but it holds no Transformer Engine module, so megatron "
            "computes without FP8; refusing to record FP8 (build it with flowpin.train.transformer.build_model)"
        )
    fp8_record = None
    if fp8 is not None:
        fp8_record = {
            "format": str(fp8),
            "recipe": str(getattr(config.fp8_recipe, "value", config.fp8_recipe)),
            "margin": int(config.fp8_margin),
            "amaxHistoryLen": int(config.fp8_amax_history_len),
            "amaxComputeAlgo": str(config.fp8_amax_compute_algo),
            "fp8Param": bool(config.fp8_param),
        }
    te_version = probe_transformer_engine().get("version") if te_modules else None
    return {
        "device": devices[0] if len(devices) == 1 else ",".join(devices),
        "paramDtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "computeDtype": "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32",
        "fp8": fp8_record,
        "layerSpec": "transformer_engine" if te_modules else "local",
        "transformerEngine": te_version,
    }


# --- megatron -------------------------------------------------------------------------------------------


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise InternalError(f"device {device!r} is not one of {', '.join(DEVICES)}")


def to_transformer_config(cfg: ModelConfig, *, device: str) -> TransformerConfig:
    """megatron-core's ``TransformerConfig`` for ``cfg`` on ``device`` (``cpu`` or ``cuda``).

    Pure mapping (allocates nothing, needs no process group), after :func:`check_precision`. Fusions that
    need CUDA kernels are off, ``deterministic_mode`` is on, and on CPU weights are initialised on the CPU
    (``use_cpu_initialization``). The YaRN ``yarn_*`` attributes are deliberately *not* set here (see the
    module docstring); the layers that use YaRN get them on a private copy.
    """
    check_precision(cfg, device)
    from megatron.core.transformer import TransformerConfig

    windowed = window_pattern(cfg)
    precision = cfg.precision
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_eps,
        qk_layernorm=cfg.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        init_method_std=cfg.init_method_std,
        window_size=None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0),
        window_attn_skip_freq=None if cfg.sliding_window is None else [int(w) for w in windowed],
        rotary_interleaved=False,
        apply_rope_fusion=False,
        params_dtype=DTYPES[cfg.dtype],
        bf16=cfg.dtype == "bf16",
        **fp8_fields(precision),
        use_cpu_initialization=device == "cpu",
        perform_initialization=True,
        deterministic_mode=True,
        attention_softmax_in_fp32=True,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        cuda_graph_scope=[],  # the whole layer; megatron's default "full" means the same but warns it is deprecated
    )


def fp8_fields(precision: PrecisionConfig) -> dict[str, Any]:
    """The ``TransformerConfig`` FP8 fields for ``precision`` (one mapping for building and for checking)."""
    return {
        "fp8": precision.fp8,
        "fp8_recipe": precision.fp8_recipe,
        "fp8_margin": precision.fp8_margin,
        "fp8_amax_history_len": precision.fp8_amax_history_len,
        "fp8_amax_compute_algo": precision.fp8_amax_compute_algo,
        "fp8_param": precision.fp8_param,
    }


def yarn_attributes(yarn: YarnConfig) -> dict[str, Any]:
    """The ``yarn_*`` attributes megatron reads from a config for YaRN (they are not ``TransformerConfig``
    fields, so ``TransformerConfig(...)`` cannot take them; they are set on the object)."""
    return {
        "yarn_rotary_scaling_factor": yarn.scale_factor,
        "yarn_original_max_position_embeddings": yarn.original_max_position,
        "yarn_beta_fast": yarn.beta_fast,
        "yarn_beta_slow": yarn.beta_slow,
        "yarn_mscale": yarn.mscale,
        "yarn_mscale_all_dim": yarn.mscale_all_dim,
        "yarn_correction_range_round_to_int": True,
    }


@functools.cache
def yarn_self_attention_class() -> type[torch.nn.Module]:
    """megatron's ``SelfAttention`` with YaRN rotary embeddings for this layer only (built on first use, so
    importing this module does not import megatron)."""
    from megatron.core.models.common.embeddings import (  # type: ignore[import-untyped,unused-ignore]
        YarnRotaryEmbedding,
    )
    from megatron.core.transformer.attention import SelfAttention  # type: ignore[import-untyped,unused-ignore]

    class YarnSelfAttention(SelfAttention):  # type: ignore[misc,unused-ignore]
        """Self-attention that rotates queries/keys with YaRN-scaled RoPE and YaRN's attention factor.

        Spec params: ``yarn`` (:class:`YarnConfig`) and ``rotary_base``. The model-wide RoPE tensor megatron
        passes in is replaced by YaRN frequencies for the same positions (``0 .. seq-1``, as GPTModel
        computes them); the attention factor comes from a private config copy carrying ``yarn_*``.
        """

        def __init__(self, config: Any, *args: Any, yarn: YarnConfig, rotary_base: float, **kwargs: Any) -> None:
            layer_config = copy.copy(config)
            for key, value in yarn_attributes(yarn).items():
                setattr(layer_config, key, value)
            super().__init__(layer_config, *args, **kwargs)
            self.yarn_rotary_pos_emb = YarnRotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=1.0,
                rotary_interleaved=False,
                rotary_base=rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
                scaling_factor=yarn.scale_factor,
                original_max_position_embeddings=yarn.original_max_position,
                beta_fast=yarn.beta_fast,
                beta_slow=yarn.beta_slow,
                mscale=yarn.mscale,
                mscale_all_dim=yarn.mscale_all_dim,
                correction_range_round_to_int=True,
            )

        def forward(self, hidden_states: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
            # Megatron's positional order: key_value_states, inference_context, rotary_pos_emb, ...
            positional = len(args) > 2
            emb = args[2] if positional else kwargs.get("rotary_pos_emb")
            if emb is not None:
                seq_len = (emb[0] if isinstance(emb, tuple) else emb).shape[0]
                yarn_emb, _mscale = self.yarn_rotary_pos_emb(seq_len)
                if positional:
                    args = (*args[:2], yarn_emb, *args[3:])
                else:
                    kwargs["rotary_pos_emb"] = yarn_emb
            return super().forward(hidden_states, attention_mask, *args, **kwargs)

    return YarnSelfAttention


def block_spec(cfg: ModelConfig, *, use_transformer_engine: bool) -> Any:
    """megatron ``TransformerBlockSubmodules``: one layer spec per layer (YaRN layers swap the attention
    class), with the final norm megatron itself would use for that backend."""
    from megatron.core.transformer.transformer_block import (  # type: ignore[import-untyped,unused-ignore]
        TransformerBlockSubmodules,
    )

    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm  # type: ignore[import-untyped,unused-ignore]
        from megatron.core.models.gpt.gpt_layer_specs import (  # type: ignore[import-untyped,unused-ignore]
            get_gpt_layer_with_transformer_engine_spec,
        )

        base = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.qk_norm)
        final_norm: Any = TENorm
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.torch_norm import WrappedTorchNorm  # type: ignore[import-untyped,unused-ignore]

        base = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_norm, normalization=cfg.normalization)
        final_norm = WrappedTorchNorm
    yarn_spec = None
    if cfg.yarn is not None:
        attention = base.submodules.self_attention
        yarn_attention = dataclasses.replace(
            attention,
            module=yarn_self_attention_class(),
            params={**attention.params, "yarn": cfg.yarn, "rotary_base": cfg.rotary_base},
        )
        yarn_spec = dataclasses.replace(
            base, submodules=dataclasses.replace(base.submodules, self_attention=yarn_attention)
        )
    specs = [yarn_spec if yarn else base for yarn in yarn_pattern(cfg)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


def build_model(cfg: ModelConfig, *, device: str, seed: int, deterministic: bool = True) -> GPTModel:
    """Build the model on ``device``; its weights are a function of ``cfg`` and ``seed`` only.

    CPU: megatron's local layer spec, weights initialised on the CPU from the default generator. CUDA:
    the Transformer Engine spec when TE is importable (else the local spec), weights initialised through
    megatron's model-parallel RNG stream. The global torch RNG is left as it was (``fork_rng``), but
    megatron's RNG tracker is (re)seeded from ``seed`` (``model_parallel_cuda_manual_seed``), which the
    model's forward needs. Requires :func:`flowpin.train.distributed.init_distributed` first.
    ``deterministic=False`` turns megatron's ``deterministic_mode`` off: only for throughput baselines
    (``benchmarks/h100_throughput.py``), never for a recorded training run.
    """
    check_int(seed, "seed", minimum=0, maximum=2**32 - 1)
    _check_device(device)
    check_precision(cfg, device)
    from megatron.core import parallel_state, tensor_parallel  # type: ignore[import-untyped,unused-ignore]
    from megatron.core.models.gpt import GPTModel

    from flowpin.train import megatron_cpu

    if not parallel_state.model_parallel_is_initialized():
        raise FlowpinError(
            "build_model: megatron's parallel state is not initialised; call "
            "flowpin.train.distributed.init_distributed() first"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise FlowpinError("build_model: device 'cuda' requested, but torch sees no CUDA device")
    if device == "cpu" and not megatron_cpu.applied():
        raise FlowpinError(
            "build_model: megatron-core's CUDA-only code is not patched for CPU; call "
            "flowpin.train.megatron_cpu.apply() (init_distributed does on a machine without CUDA) first"
        )
    use_te = device == "cuda" and bool(probe_transformer_engine().get("importable"))
    if deterministic and use_te and os.environ.get("NVTE_ALLOW_NONDETERMINISTIC_ALGO") != "0":
        # megatron's deterministic_mode makes TE attention raise a bare RuntimeError otherwise.
        raise FlowpinError(
            "build_model: Transformer Engine attention is deterministic only with "
            "NVTE_ALLOW_NONDETERMINISTIC_ALGO=0; call flowpin.train.distributed.set_deterministic(seed) first"
        )
    config = to_transformer_config(cfg, device=device)
    config.deterministic_mode = deterministic
    spec = block_spec(cfg, use_transformer_engine=use_te)
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.max_sequence_length,
            position_embedding_type="rope",
            rotary_base=cfg.rotary_base,
            share_embeddings_and_output_weights=False,
        )
    if device == "cuda":
        model = model.cuda(torch.cuda.current_device())
    if cfg.dtype == "bf16":
        model = model.bfloat16()  # what megatron's Float16Module does (norms included)
    return model


# --- parameter counts -----------------------------------------------------------------------------------


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (elements) a built model holds."""
    return sum(p.numel() for p in model.parameters())


def estimate_params(cfg: ModelConfig) -> int:
    """Parameters :func:`build_model` will create, computed from the config (no allocation).

    Untied input embedding and output layer (``padded_vocab_size`` rows each), per layer: the fused QKV
    projection (``hidden x (heads + 2 groups) x head_dim``), the output projection, per-head q/k norms,
    SwiGLU (gate + up + down) and two RMSNorms; plus the final norm. No biases.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attention = h * (q + 2 * kv) + q * h + (2 * d if cfg.qk_norm else 0)
    mlp = 3 * h * cfg.ffn_hidden_size
    per_layer = attention + mlp + 2 * h
    return cfg.num_layers * per_layer + 2 * cfg.padded_vocab_size * h + h
