"""The megatron DDP gradient engine: recipe checks, config mapping and its CPU buffers (no GPU needed).

Training with it (DP=1 and DP=2 on gloo, bitwise equal to flowpin's own reduction) is in
tests/train/test_data_parallel.py.
"""

from __future__ import annotations

import pytest
import torch

from flowpin.errors import RecipeError
from flowpin.recipe import to_config
from flowpin.runtime import prepare_environment
from flowpin.train import megatron_cpu
from flowpin.train.megatron_ddp import DataParallelConfig, MegatronGradSync, ddp_config, refuse_untrained_optimizer
from flowpin.train.pretrain import TrainingStageConfig
from flowpin.train.transformer import ModelConfig, build_model


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"engine": "fsdp"}, "train.data_parallel.engine"),
        ({"engine": "flowpin", "overlap_grad_reduce": True}, "megatron DDP settings"),
        ({"engine": "flowpin", "bucket_size": 1000}, "megatron DDP settings"),
        ({"engine": "megatron", "bucket_size": 0}, "train.data_parallel.bucket_size"),
        ({"engine": "megatron", "grad_reduce_in_fp32": "yes"}, "must be true or false"),
    ],
)
def test_bad_data_parallel_recipes_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        DataParallelConfig(**fields)  # type: ignore[arg-type]


def test_the_stage_recipe_defaults_to_flowpins_engine_and_takes_megatrons() -> None:
    loop = {"steps": 1, "batch_size": 1, "seed": 0, "optim": {"schedule": {"total_steps": 1, "peak_lr": 1e-3}}}
    plain = {"loop": loop, "order_seed": 0}
    assert to_config(TrainingStageConfig, plain, where="train").data_parallel.engine == "flowpin"
    cfg = to_config(TrainingStageConfig, {**plain, "data_parallel": {"engine": "megatron"}}, where="train")
    assert cfg.data_parallel.settings()["data_parallel_engine"] == "megatron"
    with pytest.raises(RecipeError, match=r"train\.data_parallel\.nccl"):
        to_config(TrainingStageConfig, {**plain, "data_parallel": {"nccl": True}}, where="train")


def test_megatron_config_mapping() -> None:
    cfg = DataParallelConfig(engine="megatron", overlap_grad_reduce=True, bucket_size=4096, grad_reduce_in_fp32=False)
    mapped = ddp_config(cfg)
    assert (mapped.overlap_grad_reduce, mapped.bucket_size, mapped.grad_reduce_in_fp32) == (True, 4096, False)
    assert mapped.use_distributed_optimizer is False
    assert cfg.settings()["megatron_ddp"] == {
        "grad_reduce_in_fp32": False,
        "overlap_grad_reduce": True,
        "bucket_size": 4096,
    }
    with pytest.raises(RecipeError, match="no megatron DDP config"):
        ddp_config(DataParallelConfig())


def test_the_engine_refuses_the_distributed_optimizer_it_does_not_train_yet() -> None:
    """A valid recipe value (``flowpin plan`` plans it), refused wherever the engine would build its gradients."""
    cfg = DataParallelConfig(engine="megatron", use_distributed_optimizer=True)
    for refuse in (refuse_untrained_optimizer, ddp_config):
        with pytest.raises(RecipeError, match="does not train it yet"):
            refuse(cfg)
    refuse_untrained_optimizer(DataParallelConfig(engine="megatron"))


def test_megatron_ddp_keeps_its_grad_buffers_on_cpu_and_hands_back_reduced_grads() -> None:
    with prepare_environment(seed=0, threads=None):  # as a stage's entry point: CPU patches for its duration
        assert any("_ParamAndGradBuffer" in name for name in megatron_cpu.applied())
        model = build_model(
            ModelConfig(
                num_layers=1,
                hidden_size=32,
                ffn_hidden_size=64,
                num_attention_heads=2,
                num_query_groups=1,
                vocab_size=64,
                max_sequence_length=8,
            ),
            device="cpu",
            seed=0,
        )
        sync = MegatronGradSync(model, DataParallelConfig(engine="megatron"))
        params = list(model.parameters())
        assert all(p.main_grad.device.type == "cpu" for p in params)
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(8).unsqueeze(0).expand(2, 8)
        for _ in range(2):  # the buffers are zeroed between steps, not accumulated
            sync.before_backward()
            for p in params:
                p.grad = None
            model(ids[:, :-1], positions, None, labels=ids[:, 1:]).mean().backward()
            sync.after_backward(params)
            grads = [p.grad.clone() for p in params]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        expected = torch.autograd.grad(model(ids[:, :-1], positions, None, labels=ids[:, 1:]).mean(), params)
        assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))
        with pytest.raises(RecipeError, match="megatron model"):
            MegatronGradSync(torch.nn.Linear(2, 2), DataParallelConfig(engine="megatron"))
