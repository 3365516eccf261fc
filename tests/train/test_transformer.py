"""flowpin.train.transformer and flowpin.train.distributed: recipes, the megatron mapping, the built model on CPU."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel  # type: ignore[import-untyped,unused-ignore]
from megatron.core.models.gpt import GPTModel  # type: ignore[import-untyped,unused-ignore]
from megatron.core.models.gpt.gpt_layer_specs import (  # type: ignore[import-untyped,unused-ignore]
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.enums import AttnMaskType  # type: ignore[import-untyped,unused-ignore]
from megatron.core.transformer.utils import is_layer_window_attention  # type: ignore[import-untyped,unused-ignore]
from omegaconf import OmegaConf

from flowpin.environment import probe_transformer_engine
from flowpin.errors import FlowpinError, RecipeError
from flowpin.recipe import to_config
from flowpin.train import megatron_cpu
from flowpin.train.distributed import DistInfo, destroy, init_distributed, set_deterministic
from flowpin.train.transformer import (
    ModelConfig,
    PrecisionConfig,
    YarnConfig,
    build_model,
    check_precision,
    count_params,
    effective_precision,
    estimate_params,
    layer_layout,
    to_transformer_config,
    window_pattern,
    yarn_attributes,
    yarn_pattern,
    yarn_self_attention_class,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "params" / "model"
TINY = ModelConfig(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    max_sequence_length=32,
    sliding_window=8,
)
YARN = YarnConfig(scale_factor=4.0, original_max_position=16)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(**overrides: Any) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


def recipe(name: str) -> ModelConfig:
    return to_config(ModelConfig, OmegaConf.load(RECIPES / f"{name}.yaml"), where="model")  # type: ignore[arg-type]


def batch(cfg: ModelConfig, size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, positions and next-token labels from a private generator (the global RNG is not touched)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (size, cfg.max_sequence_length + 1), generator=gen)
    positions = torch.arange(cfg.max_sequence_length).expand(size, -1)
    return tokens[:, :-1], positions, tokens[:, 1:]


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if isinstance(tensor, torch.Tensor):
            h.update(name.encode() + b"\0" + tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dist_info() -> Iterator[DistInfo]:
    """init_distributed itself (what flowpin.runtime.prepare_environment calls); the process is left as found."""
    before = megatron_cpu.applied()
    info = init_distributed()
    yield info
    destroy()
    megatron_cpu.restore(only=[name for name in info.cpu_patches if name not in before])


# --- recipes and validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny_wide", "olmo3_7b", "olmo3_32b"])
def test_recipes_load(name: str) -> None:
    cfg = recipe(name)
    assert cfg.normalization == "RMSNorm" and cfg.activation == "swiglu" and cfg.qk_norm
    assert cfg.precision.fp8 is None and cfg.yarn is None
    assert window_pattern(cfg)[-1] is False  # the last layer is always full


def test_olmo3_recipes_match_the_published_architecture() -> None:
    seven, big = recipe("olmo3_7b"), recipe("olmo3_32b")

    def shape(cfg: ModelConfig) -> tuple[int, ...]:
        return (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size)

    assert shape(seven) == (32, 4096, 32, 32, 11008)
    assert shape(big) == (64, 5120, 40, 8, 27648)  # GQA at 32B
    for cfg in (seven, big):
        assert (cfg.sliding_window, cfg.max_sequence_length, cfg.rotary_base, cfg.dtype) == (4096, 8192, 500000, "bf16")
        assert sum(window_pattern(cfg)) == cfg.num_layers * 3 // 4  # 3 of every 4 layers windowed


@pytest.mark.parametrize(("name", "published"), [("olmo3_7b", 7e9), ("olmo3_32b", 32e9)])
def test_parameter_estimate_is_within_ten_percent_of_the_published_size(name: str, published: float) -> None:
    estimate = estimate_params(recipe(name))
    assert abs(estimate - published) / published < 0.10, f"{name}: {estimate / 1e9:.2f}B"


def test_unknown_and_mistyped_recipe_keys_name_the_key() -> None:
    raw = OmegaConf.to_container(OmegaConf.load(RECIPES / "tiny.yaml"))
    assert isinstance(raw, dict)
    base: dict[str, Any] = {str(k): v for k, v in raw.items()}
    with pytest.raises(RecipeError, match=r"model\.hidden_dim: unknown key"):
        to_config(ModelConfig, {**base, "hidden_dim": 64}, where="model")
    with pytest.raises(RecipeError, match=r"model\.precision\.fp9: unknown key"):
        to_config(ModelConfig, {**base, "precision": {"fp9": "e4m3"}}, where="model")
    with pytest.raises(RecipeError, match=r"model\.num_layers: expected int"):
        to_config(ModelConfig, {**base, "num_layers": "four"}, where="model")
    with pytest.raises(RecipeError, match=r"model\.yarn\.original_max_position: missing required key"):
        to_config(ModelConfig, {**base, "yarn": {"scale_factor": 4}}, where="model")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_query_groups": 3}, "model.num_query_groups"),
        ({"num_attention_heads": 3}, "model.num_attention_heads"),  # does not divide 64
        ({"hidden_size": 72, "num_attention_heads": 8, "num_query_groups": 8}, "model.num_attention_heads"),  # odd
        ({"sliding_window": 0}, "model.sliding_window"),
        ({"full_attention_every": 0}, "model.full_attention_every"),
        ({"normalization": "LayerNorm"}, "model.normalization"),
        ({"activation": "gelu"}, "model.activation"),
        ({"dtype": "fp16"}, "model.dtype"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"yarn": YarnConfig(scale_factor=4.0, original_max_position=16, beta_fast=1.0)}, "model.yarn.beta_fast"),
        ({"yarn": YarnConfig(scale_factor=0.5, original_max_position=16)}, "model.yarn.scale_factor"),
        ({"yarn": YarnConfig(scale_factor=2.0, original_max_position=16, apply_to="odd")}, "model.yarn.apply_to"),
        ({"precision": PrecisionConfig(fp8="e5m2")}, "model.precision.fp8"),
        ({"precision": PrecisionConfig(fp8_param=True)}, "model.precision.fp8_param"),
        ({"precision": PrecisionConfig(fp8="hybrid", fp8_recipe="custom")}, "model.precision.fp8_recipe"),
    ],
)
def test_invalid_values_name_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match="^" + re.escape(key) + ":"):
        tiny(**overrides)


def test_with_vocab_replaces_and_pads_the_vocabulary() -> None:
    cfg = recipe("olmo3_7b").with_vocab(100278)
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (100278, 100352)
    assert tiny(vocab_multiple=1).with_vocab(1000).padded_vocab_size == 1000
    with pytest.raises(RecipeError, match=r"model\.vocab_size"):
        TINY.with_vocab(0)


# --- layer layout ---------------------------------------------------------------------------------------


def test_megatron_integer_skip_frequency_leaves_the_last_layer_windowed_when_depth_is_not_a_multiple() -> None:
    # Why flowpin passes an explicit per-layer list: megatron's int form only looks at layer_number % N.
    assert [is_layer_window_attention((7, 0), 4, n) for n in range(1, 7)] == [True, True, True, False, True, True]


@pytest.mark.parametrize(
    ("layers", "every", "expected"),
    [
        (6, 4, "SSSFSF"),
        (8, 4, "SSSFSSSF"),
        (3, 4, "SSF"),
        (1, 4, "F"),
        (4, 1, "FFFF"),
        (5, 2, "SFSFF"),
    ],
)
def test_window_pattern(layers: int, every: int, expected: str) -> None:
    cfg = tiny(num_layers=layers, full_attention_every=every)
    assert "".join("S" if w else "F" for w in window_pattern(cfg)) == expected
    megatron = to_transformer_config(cfg, device="cpu")
    assert [
        is_layer_window_attention(megatron.window_size, megatron.window_attn_skip_freq, n) for n in range(1, layers + 1)
    ] == list(window_pattern(cfg))


def test_olmo3_7b_full_attention_layers() -> None:
    cfg = recipe("olmo3_7b")
    full = [i + 1 for i, windowed in enumerate(window_pattern(cfg)) if not windowed]  # 1-based, as the paper
    assert full == list(range(4, 33, 4))
    assert window_pattern(tiny(sliding_window=None)) == (False, False)


def test_yarn_pattern_and_layout() -> None:
    cfg = tiny(num_layers=6, yarn=YARN)
    assert yarn_pattern(cfg) == (False, False, False, True, False, True)  # the full-attention layers
    assert yarn_pattern(dataclasses.replace(cfg, yarn=dataclasses.replace(YARN, apply_to="all"))) == (True,) * 6
    assert yarn_pattern(TINY) == (False, False)
    assert layer_layout(cfg)[0] == {"layer": 0, "attention": "sliding", "window": 8, "rope": "rope"}
    assert layer_layout(cfg)[5] == {"layer": 5, "attention": "full", "window": None, "rope": "yarn"}


# --- TransformerConfig mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "olmo3_7b", "olmo3_32b"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_transformer_config_builds_without_weights(name: str, device: str) -> None:
    cfg = recipe(name)
    tc = to_transformer_config(cfg, device=device)
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (
        cfg.num_attention_heads,
        cfg.num_query_groups,
        cfg.head_dim,
    )
    assert tc.gated_linear_unit and tc.activation_func is F.silu and not tc.add_bias_linear
    assert tc.normalization == "RMSNorm" and tc.qk_layernorm and tc.layernorm_epsilon == cfg.norm_eps
    assert cfg.sliding_window is not None and tc.window_size == (cfg.sliding_window - 1, 0)
    assert tc.window_attn_skip_freq == [int(w) for w in window_pattern(cfg)]
    assert tc.hidden_dropout == tc.attention_dropout == 0.0
    assert tc.bf16 == (cfg.dtype == "bf16") and tc.params_dtype == (torch.bfloat16 if tc.bf16 else torch.float32)
    assert tc.use_cpu_initialization == (device == "cpu") and tc.deterministic_mode
    assert tc.fp8 is None and not tc.apply_rope_fusion and not tc.masked_softmax_fusion
    assert not hasattr(tc, "yarn_rotary_scaling_factor")  # never on the shared config (module docstring)


# --- FP8 refusal and effective precision --------------------------------------------------------------------

FP8 = tiny(dtype="bf16", precision=PrecisionConfig(fp8="hybrid"))
NO_TE: dict[str, Any] = {"installed": False, "version": None, "importable": False, "error": None}
BROKEN_TE: dict[str, Any] = {"installed": True, "version": "2.8", "importable": False, "error": "RuntimeError: no GPU"}
TE: dict[str, Any] = {"installed": True, "version": "2.8", "importable": True, "error": None}


def test_fp8_is_refused_on_cpu() -> None:
    with pytest.raises(RecipeError, match=r"model\.precision\.fp8: 'hybrid' needs Transformer Engine on a CUDA device"):
        check_precision(FP8, "cpu", te_probe=TE)
    with pytest.raises(RecipeError, match=r"model\.precision\.fp8"):
        to_transformer_config(FP8, device="cpu")


def test_fp8_is_refused_without_an_importable_transformer_engine() -> None:
    with pytest.raises(RecipeError, match="which is not installed"):
        check_precision(FP8, "cuda", te_probe=NO_TE)
    with pytest.raises(RecipeError, match=r"cannot be imported \(RuntimeError: no GPU\)"):
        check_precision(FP8, "cuda", te_probe=BROKEN_TE)
    check_precision(FP8, "cuda", te_probe=TE)  # accepted where TE is importable
    check_precision(TINY, "cpu", te_probe=NO_TE)  # no FP8: nothing to check


def test_build_model_refuses_fp8_before_building(dist_info: DistInfo) -> None:
    with pytest.raises(RecipeError, match=r"model\.precision\.fp8"):
        build_model(FP8, device="cpu", seed=0)


def test_effective_precision_reads_the_model(dist_info: DistInfo) -> None:
    model = build_model(TINY, device="cpu", seed=0)
    assert effective_precision(model) == {
        "device": "cpu",
        "paramDtypes": ["float32"],
        "computeDtype": "float32",
        "fp8": None,
        "layerSpec": "local",
        "transformerEngine": None,
    }
    model.config.fp8 = "e4m3"  # what a hand-built megatron model without TE would silently carry
    with pytest.raises(FlowpinError, match="refusing to record FP8"):
        effective_precision(model)


# --- the built model on CPU ---------------------------------------------------------------------------------


def test_dist_info_for_a_single_process(dist_info: DistInfo) -> None:
    assert (dist_info.rank, dist_info.world_size, dist_info.local_rank, dist_info.is_main) == (0, 1, 0, True)
    assert (dist_info.backend, dist_info.device, dist_info.launcher) == ("gloo", "cpu", "single")
    assert list(dist_info.cpu_patches) == megatron_cpu.applied() == [p.name for p in megatron_cpu.PATCHES]
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_pipeline_model_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size() == 1
    with pytest.raises(FlowpinError, match="already exists"):
        init_distributed()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE missing"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "inconsistent"),
    ],
)
def test_init_distributed_refuses_a_broken_launcher_environment(
    dist_info: DistInfo, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(FlowpinError, match=message):
        init_distributed(environ=environ)


def test_forward_and_loss(dist_info: DistInfo) -> None:
    cfg = tiny()
    model = build_model(cfg, device="cpu", seed=0)
    inputs, positions, labels = batch(cfg)
    loss = model(inputs, positions, None, labels=labels)
    assert loss.shape == (2, cfg.max_sequence_length) and torch.isfinite(loss).all()
    assert abs(loss.mean().item() - math.log(cfg.padded_vocab_size)) < 0.5  # near-uniform at init
    logits = model(inputs, positions, None)
    assert logits.shape == (2, cfg.max_sequence_length, cfg.padded_vocab_size)
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_architecture_is_present_in_the_built_module(dist_info: DistInfo) -> None:
    cfg = tiny()
    model = build_model(cfg, device="cpu", seed=0)
    d = cfg.head_dim
    for layer in model.decoder.layers:
        attention = layer.self_attention
        # GQA: one fused projection with heads query + 2 x groups key/value heads
        assert attention.linear_qkv.weight.shape == (
            (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d,
            cfg.hidden_size,
        )
        assert attention.core_attention.num_query_groups_per_partition == cfg.num_query_groups
        # QK-norm: RMSNorm over each head
        for norm in (attention.q_layernorm, attention.k_layernorm):
            assert isinstance(norm, torch.nn.RMSNorm) and tuple(norm.normalized_shape) == (d,)
        # RMSNorm before attention and MLP
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == cfg.norm_eps
        # SwiGLU: fc1 holds gate and up (2 x ffn), silu-gated
        assert layer.mlp.linear_fc1.weight.shape == (2 * cfg.ffn_hidden_size, cfg.hidden_size)
        assert layer.mlp.linear_fc2.weight.shape == (cfg.hidden_size, cfg.ffn_hidden_size)
        assert layer.mlp.config.gated_linear_unit and layer.mlp.activation_func is F.silu
        assert layer.mlp.linear_fc1.bias is None
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)
    assert model.output_layer.weight.data_ptr() != model.embedding.word_embeddings.weight.data_ptr()  # untied


@pytest.mark.parametrize("qk_norm", [True, False])
def test_estimate_params_counts_exactly(dist_info: DistInfo, qk_norm: bool) -> None:
    cfg = tiny(qk_norm=qk_norm, vocab_size=300)  # padded to 384
    assert count_params(build_model(cfg, device="cpu", seed=0)) == estimate_params(cfg)


def test_sliding_window_layers_see_exactly_the_window(dist_info: DistInfo) -> None:
    cfg = tiny()  # layer 0 windowed (8 keys, itself included), layer 1 (the last) full
    model = build_model(cfg, device="cpu", seed=0)
    windows = [layer.self_attention.core_attention.scale_mask_softmax.window_size for layer in model.decoder.layers]
    assert windows == [(7, 0), None]
    gen = torch.Generator().manual_seed(1)
    seq, d = 16, cfg.head_dim
    q = torch.randn(seq, 1, cfg.num_attention_heads, d, generator=gen)
    k = torch.randn(seq, 1, cfg.num_query_groups, d, generator=gen)
    v = torch.randn(seq, 1, cfg.num_query_groups, d, generator=gen)

    def out_at(layer: int, t: int, poke: int) -> torch.Tensor:
        k2, v2 = k.clone(), v.clone()
        k2[poke] += 3.0
        v2[poke] += 3.0
        core = model.decoder.layers[layer].self_attention.core_attention
        out: torch.Tensor = core(q, k2, v2, None, attn_mask_type=AttnMaskType.causal)[t]
        return out

    base = model.decoder.layers[0].self_attention.core_attention(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    t = 12
    assert torch.equal(out_at(0, t, poke=t - 8), base[t])  # 9 keys back: outside the window
    assert not torch.equal(out_at(0, t, poke=t - 7), base[t])  # 8 keys back (window edge): seen
    assert not torch.equal(out_at(1, t, poke=0), out_at(1, t, poke=t + 1))  # full layer sees position 0


def test_same_seed_same_weights_and_loss_different_seed_different(dist_info: DistInfo) -> None:
    cfg = tiny()
    state = torch.get_rng_state()
    a, b, c = (build_model(cfg, device="cpu", seed=s) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), state)  # building does not move the global stream
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)
    inputs, positions, labels = batch(cfg)
    loss_a = a(inputs, positions, None, labels=labels).mean()
    loss_b = b(inputs, positions, None, labels=labels).mean()
    assert loss_a.item().hex() == loss_b.item().hex()


_STEP_SCRIPT = r"""
import hashlib, json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from flowpin.train.distributed import destroy, init_distributed, set_deterministic
from flowpin.train.transformer import ModelConfig, build_model

cfg = ModelConfig(**json.loads(sys.argv[1]))
init_distributed()
set_deterministic(1234, cpu_threads=2)
model = build_model(cfg, device="cpu", seed=1234)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
gen = torch.Generator().manual_seed(99)
tokens = torch.randint(0, cfg.vocab_size, (4, cfg.max_sequence_length + 1), generator=gen)
positions = torch.arange(cfg.max_sequence_length).expand(4, -1)
loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
loss.backward()
optimizer.step()
h = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    if isinstance(tensor, torch.Tensor):
        h.update(name.encode() + b"\0" + tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
print(json.dumps({"loss": loss.item().hex(), "weights": h.hexdigest()}))
destroy()
"""


def test_one_adamw_step_is_bitwise_identical_in_two_processes() -> None:
    cfg = {k: v for k, v in dataclasses.asdict(tiny(yarn=None)).items() if k not in ("precision", "yarn")}
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STEP_SCRIPT, json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert results[0]["weights"] != "" and float.fromhex(results[0]["loss"]) > 0


# --- YaRN ---------------------------------------------------------------------------------------------------


def native_yarn_model(cfg: ModelConfig, yarn: YarnConfig, seed: int) -> Any:
    """megatron's own model-wide YaRN (position_embedding_type="yarn", yarn_* on the shared config)."""
    config = to_transformer_config(cfg, device="cpu")
    for key, value in yarn_attributes(yarn).items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.max_sequence_length,
            position_embedding_type="yarn",
            rotary_base=cfg.rotary_base,
            share_embeddings_and_output_weights=False,
        )


def test_yarn_on_every_layer_equals_megatrons_native_yarn_bitwise(dist_info: DistInfo) -> None:
    yarn = dataclasses.replace(YARN, apply_to="all")
    cfg = tiny(num_layers=4, yarn=yarn)
    ours = build_model(cfg, device="cpu", seed=3)
    native = native_yarn_model(tiny(num_layers=4), yarn, seed=3)
    assert weights_digest(ours) == weights_digest(native)
    inputs, positions, _ = batch(cfg)
    assert torch.equal(ours(inputs, positions, None), native(inputs, positions, None))


def test_yarn_is_applied_to_the_full_attention_layers_only(dist_info: DistInfo) -> None:
    cfg = tiny(num_layers=4, yarn=YARN)  # layers 0-2 windowed, 3 full
    model = build_model(cfg, device="cpu", seed=3)
    yarn_class = yarn_self_attention_class()
    kinds = [isinstance(layer.self_attention, yarn_class) for layer in model.decoder.layers]
    assert kinds == [False, False, False, True]
    # the attention factor (mscale) reaches the YaRN layer only
    scaled = [hasattr(layer.self_attention.config, "yarn_rotary_scaling_factor") for layer in model.decoder.layers]
    assert scaled == kinds and not hasattr(model.config, "yarn_rotary_scaling_factor")
    plain = build_model(tiny(num_layers=4), device="cpu", seed=3)
    inputs, positions, _ = batch(cfg)
    assert not torch.allclose(model(inputs, positions, None), plain(inputs, positions, None))


def test_pretraining_checkpoint_loads_into_the_yarn_model(dist_info: DistInfo) -> None:
    plain = build_model(tiny(num_layers=4), device="cpu", seed=8)
    extended = build_model(tiny(num_layers=4, yarn=dataclasses.replace(YARN, scale_factor=1.0)), device="cpu", seed=9)
    assert plain.state_dict().keys() == extended.state_dict().keys()
    extended.load_state_dict(plain.state_dict(), strict=True)
    inputs, positions, _ = batch(TINY)
    # scale factor 1 is plain RoPE up to rounding of YaRN's frequency blend
    torch.testing.assert_close(extended(inputs, positions, None), plain(inputs, positions, None), rtol=1e-4, atol=1e-4)


# --- determinism switches and the launcher -----------------------------------------------------------------


def test_set_deterministic_records_what_it_set(dist_info: DistInfo) -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    try:
        record = set_deterministic(42, cpu_threads=1)
        assert record["deterministicAlgorithms"] is True and record["numThreads"] == 1
        assert record["megatronRngStreams"] is True and record["device"] == "cpu" and record["env"] == {}
        first = torch.rand(3)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            stream = torch.rand(3)
        set_deterministic(42, cpu_threads=1)
        assert torch.equal(torch.rand(3), first)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(3), stream)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


_TORCHRUN_SCRIPT = r"""
import json, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
from megatron.core import parallel_state
from flowpin.train.distributed import destroy, init_distributed

info = init_distributed()
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank, "launcher": info.launcher,
                  "dp": parallel_state.get_data_parallel_world_size(), "sum": value.item()}))
destroy()
"""


def test_torchrun_world_of_two_is_data_parallel(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_TORCHRUN_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "--tee=1", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line.split("]:", 1)[-1]) for line in proc.stdout.splitlines() if '"launcher"' in line]
    assert sorted((r["rank"], r["local"]) for r in lines) == [(0, 0), (1, 1)]
    assert all((r["world"], r["launcher"], r["dp"], r["sum"]) == (2, "torchrun", 2, 3.0) for r in lines)


# --- GPU (skipped without CUDA) -----------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
def test_te_spec_fp8_forward_on_gpu(dist_info: DistInfo) -> None:
    if not probe_transformer_engine()["importable"]:
        pytest.skip("Transformer Engine is not importable")
    set_deterministic(0)
    cfg = tiny(
        hidden_size=128,
        ffn_hidden_size=512,
        max_sequence_length=64,
        dtype="bf16",
        precision=PrecisionConfig(fp8="hybrid"),
    )
    model = build_model(cfg, device="cuda", seed=0)
    precision = effective_precision(model)
    assert precision["layerSpec"] == "transformer_engine" and precision["fp8"]["format"] == "hybrid"
    assert precision["device"] == "cuda" and precision["computeDtype"] == "bfloat16"
    inputs, positions, labels = (t.cuda() for t in batch(cfg, size=2))
    loss = model(inputs, positions, None, labels=labels)
    assert torch.isfinite(loss).all()


@pytest.mark.gpu
@gpu
def test_bf16_build_on_gpu_is_deterministic(dist_info: DistInfo) -> None:
    set_deterministic(0)
    cfg = tiny(dtype="bf16")
    a, b = build_model(cfg, device="cuda", seed=1), build_model(cfg, device="cuda", seed=1)
    assert weights_digest(a.cpu()) == weights_digest(b.cpu())
    assert effective_precision(a)["paramDtypes"] == ["bfloat16"]
