"""``flowpin plan``'s arithmetic (flowpin.train.plan) against hand computations on a small model, and the
shipped recipes: the 7B DP-only multinode recipe is refused at 80 GiB, the paper-scale 7B/32B recipes fit."""

from __future__ import annotations

import pytest

from flowpin.errors import PlanError, RecipeError
from flowpin.train.layout import LayoutConfig
from flowpin.train.loop import OptimConfig, TrainConfig
from flowpin.train.megatron_ddp import DataParallelConfig
from flowpin.train.plan import (
    MEMORY_MARGIN,
    GiB,
    check_fits,
    layer_activation_bytes,
    parse_memory,
    plan_memory,
    plan_recipe,
    render_plan,
)
from flowpin.train.pretrain import TrainingStageConfig
from flowpin.train.schedule import ScheduleConfig
from flowpin.train.transformer import ModelConfig, estimate_params
from helpers import REPO

H, D, KV, FFN, LAYERS, VOCAB, SEQ = 64, 16, 32, 128, 4, 256, 32
PARAMS = 180_928
"""By hand: per layer QKV 64 x (64 + 2 x 32) + out 64 x 64 + q/k norms 2 x 16 = 12,320, SwiGLU 3 x 64 x 128 =
24,576, two norms 128: 37,024; 4 layers + embedding and output 2 x 256 x 64 + final norm 64."""
NORMS = 2 * H + 2 * D  # per layer, replicated across tensor-parallel ranks
LINEAR = 37_024 - NORMS  # per layer, split by tensor parallelism


def model(dtype: str = "bf16") -> ModelConfig:
    return ModelConfig(
        num_layers=LAYERS,
        hidden_size=H,
        ffn_hidden_size=FFN,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        dtype=dtype,
    )


def train(
    *, batch: int = 8, engine: str = "megatron", fp32_grads: bool = True, **layout: object
) -> TrainingStageConfig:
    schedule = ScheduleConfig(total_steps=10, peak_lr=1e-3)
    return TrainingStageConfig(
        loop=TrainConfig(steps=10, batch_size=batch, seed=0, optim=OptimConfig(schedule=schedule)),
        order_seed=0,
        data_parallel=DataParallelConfig(engine=engine, grad_reduce_in_fp32=fp32_grads),
        layout=LayoutConfig(**layout),  # type: ignore[arg-type]
    )


def test_the_small_model_has_the_hand_counted_parameters() -> None:
    assert estimate_params(model()) == PARAMS


def test_bf16_states_are_megatron_mixed_precision_bytes_per_parameter() -> None:
    plan = plan_memory(model(), train(), gpus=1)
    assert plan.parameters == plan.stage_parameters == PARAMS
    assert plan.weights == 2 * PARAMS  # bf16
    assert plan.main_weights == 4 * PARAMS  # fp32 main weights
    assert plan.gradients == 4 * PARAMS  # fp32 grad buffer (megatron DDP, grad_reduce_in_fp32)
    assert plan.optimizer == 8 * PARAMS  # Adam: two fp32 moments
    assert plan.states == 18 * PARAMS
    bf16_grads = plan_memory(model(), train(engine="flowpin"), gpus=1)
    assert bf16_grads.gradients == 2 * PARAMS and bf16_grads.grad_dtype == "bf16"


def test_fp32_weights_are_their_own_main_weights() -> None:
    plan = plan_memory(model("fp32"), train(), gpus=1)
    assert (plan.weights, plan.main_weights, plan.gradients, plan.optimizer) == (4 * PARAMS, 0, 4 * PARAMS, 8 * PARAMS)


def test_the_distributed_optimizer_divides_main_weights_and_optimizer_state_by_data_parallel_ranks() -> None:
    whole = plan_memory(model(), train(), gpus=4)
    sharded = plan_memory(model(), train(), gpus=4, distributed_optimizer=True)
    assert sharded.optimizer == 8 * PARAMS // 4 == whole.optimizer // 4
    assert sharded.main_weights == 4 * PARAMS // 4
    assert (sharded.weights, sharded.gradients) == (whole.weights, whole.gradients)  # ZeRO-1: not sharded
    with pytest.raises(RecipeError, match="engine=megatron"):
        plan_memory(model(), train(engine="flowpin"), gpus=4, distributed_optimizer=True)


def test_tensor_parallelism_divides_each_layers_linear_weights_and_the_embeddings() -> None:
    plan = plan_memory(model(), train(tensor=2), gpus=2)
    by_hand = LAYERS * (LINEAR // 2 + NORMS) + 2 * VOCAB * H // 2 + H  # norms replicated
    assert plan.stage_parameters == by_hand == 90_816
    assert plan.weights == 2 * by_hand


def test_pipeline_stages_split_the_layers_and_the_first_holds_micro_batches_in_flight() -> None:
    plan = plan_memory(model(), train(pipeline=2, micro_batch_size=1), gpus=2)  # 8 micro-batches per step
    assert plan.stage == "first" and plan.in_flight == 2  # 1F1B: min(micro-batches, stages)
    per_layer = layer_activation_bytes(model(), tokens=SEQ, keys=SEQ, micro_batch=1)
    assert plan.activations == 2 * (LAYERS // 2) * per_layer
    assert plan.stage_parameters == (LAYERS // 2) * (LINEAR + NORMS) + VOCAB * H  # the embedding, no output layer
    interleaved = plan_memory(model(), train(pipeline=2, virtual_pipeline=2, micro_batch_size=1), gpus=2)
    assert interleaved.in_flight == 2 + 1 / 2  # p + (p - 1) / v


def test_activations_are_korthikanti_adapted_term_by_term() -> None:
    """One layer, one sequence of 32 tokens, bf16, no dropout: by hand from the module docstring's terms."""
    sb = SEQ
    outside = sb * 4 * H * 2  # two norm inputs, the QKV and MLP inputs
    inside = sb * 2 * ((H + KV) * 2 + KV + H + 3 * FFN)  # Q, K (+ QK-norm inputs), V, attention output, SwiGLU
    scores = 4 * SEQ * SEQ * 2  # heads x s x s softmax output
    assert layer_activation_bytes(model(), tokens=SEQ, keys=SEQ, micro_batch=1) == outside + inside + scores
    assert plan_memory(model(), train(batch=1), gpus=1).activations == LAYERS * (outside + inside + scores)
    sp = layer_activation_bytes(model(), tokens=SEQ, keys=SEQ, micro_batch=1, tensor=2, sequence_parallel=True)
    assert sp == (outside + inside + scores) // 2  # everything split with sequence parallelism
    tp = layer_activation_bytes(model(), tokens=SEQ, keys=SEQ, micro_batch=1, tensor=2)
    assert tp == outside + (inside + scores) // 2  # without it, the outside part is replicated


def test_recompute_reduces_activations_none_then_selective_then_full() -> None:
    none, selective, full = (
        plan_memory(model(), train(micro_batch_size=8, recompute=r), gpus=1).activations
        for r in ("none", "selective", "full")
    )
    assert none > selective > full
    per_layer_input = SEQ * 8 * H * 2
    assert full == LAYERS * per_layer_input + layer_activation_bytes(model(), tokens=SEQ, keys=SEQ, micro_batch=8)


def test_context_parallelism_divides_the_tokens_per_gpu() -> None:
    for recompute in ("none", "selective"):
        whole = plan_memory(model(), train(recompute=recompute), gpus=1)
        halved = plan_memory(model(), train(context=2, recompute=recompute), gpus=2)  # one replica on 2 GPUs
        assert halved.layout.data == whole.layout.data == 1
        assert halved.activations * 2 == whole.activations  # 16 of the 32 tokens per GPU (scores: 16 x 32 keys)


def test_communication_volumes_follow_the_ring_algorithms() -> None:
    plan = plan_memory(model(), train(), gpus=4)
    assert plan.communication.data_parallel == int(2 * 3 / 4 * 4 * PARAMS)  # fp32 gradient all-reduce
    dist = plan_memory(model(), train(), gpus=4, distributed_optimizer=True)
    assert dist.communication.data_parallel == int(3 / 4 * 4 * PARAMS + 3 / 4 * 2 * PARAMS)  # RS + AG (bf16)
    tp = plan_memory(model(), train(tensor=2, micro_batch_size=4), gpus=2)
    activation = SEQ * 4 * H * 2
    assert tp.communication.tensor_parallel == int(4 * 2 * 1 / 2 * activation * LAYERS * 2)  # 4 all-reduces/layer
    assert plan.communication.tensor_parallel == plan.communication.pipeline == 0


def test_a_layout_the_model_cannot_be_split_into_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"train\.layout\.tensor: 3 does not divide model\.num_attention_heads"):
        plan_memory(model(), train(tensor=3), gpus=3)
    with pytest.raises(RecipeError, match=r"train\.layout\.pipeline: 4 layers"):
        plan_memory(model(), train(pipeline=3), gpus=3)


def test_check_fits_refuses_with_the_numbers() -> None:
    plan = plan_memory(model(), train(), gpus=1)
    check_fits(plan, int(plan.total / (1 - MEMORY_MARGIN)) + 2)
    with pytest.raises(PlanError) as info:
        check_fits(plan, plan.total)  # the margin leaves less than the plan
    message = str(info.value)
    assert "the plan needs" in message and "after the 10% margin" in message and "use_distributed_optimizer" in message


def test_memory_sizes_parse_in_both_units() -> None:
    assert parse_memory("80GiB") == 80 * GiB
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("141 GB") == 141 * 10**9 and parse_memory("1024") == 1024
    for bad in ("80XB", "", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


# --- the shipped recipes -----------------------------------------------------------------------------------


def test_the_dp_only_7b_multinode_recipe_is_refused_on_80gib_gpus() -> None:
    plan = plan_recipe(REPO / "params", "pretrain_multinode", [], gpus=32)
    assert plan.states == 18 * plan.parameters  # no sharding: bf16 + fp32 main + fp32 grads + Adam
    assert plan.states > 80 * GiB  # before any activation
    with pytest.raises(PlanError, match="the plan needs"):
        check_fits(plan, 80 * GiB)


@pytest.mark.parametrize(("recipe", "gpus"), [("pretrain_olmo3_7b", 512), ("pretrain_olmo3_32b", 1024)])
def test_the_paper_scale_recipes_fit_80gib_h100s(recipe: str, gpus: int) -> None:
    plan = plan_recipe(REPO / "params", recipe, [], gpus=gpus)
    check_fits(plan, 80 * GiB)
    assert plan.distributed_optimizer and plan.sequence_length == 8192
    assert "fits" in render_plan(plan, 80 * GiB)
    assert plan.layout.world_size == gpus and plan.layout.micro_batch_size == 1


def test_the_7b_recipe_needs_its_distributed_optimizer_and_context_parallelism() -> None:
    for override in ("train.data_parallel.use_distributed_optimizer=false", "train.layout.context=1"):
        plan = plan_recipe(REPO / "params", "pretrain_olmo3_7b", [override], gpus=512)
        with pytest.raises(PlanError):
            check_fits(plan, 80 * GiB)
