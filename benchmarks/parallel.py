"""``flowpin plan``'s numbers: the paper-scale layouts, and the tiny model's prediction beside a measurement.

    python benchmarks/parallel.py [--steps 3] [--threads 2]

Prints:

* the plan (:mod:`flowpin.train.plan`) of ``params/pretrain_olmo3_7b.yaml`` on 512 GPUs and
  ``params/pretrain_olmo3_32b.yaml`` on 1024 GPUs, at their shipped layouts, on 80 GiB GPUs, and of the
  DP-only ``params/pretrain_multinode.yaml`` on 32 (refused: its numbers);
* for the tiny reference model (``params/pretrain.yaml``, data parallel 1, fp32, one micro-batch of its
  8 x 256 tokens) the plan's predicted bytes per rank -- weights, gradients, Adam state, activations,
  logits -- beside the peak resident memory this process gains while it builds the model and trains
  ``--steps`` AdamW steps on seeded random tokens (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``
  first), and their ratio (predicted / measured).

The engine trains only the default layout until issue 16 lands, so nothing else is measured here yet: step
time per layout beside DP1 and peak memory per rank under TP/PP belong to that work. On a CPU the
measurement also holds what the plan leaves to its margin (the allocator's caching, autograd's and the
optimizer's temporaries, megatron's buffers): read the ratio as how much of the real footprint the formulas
account for.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
import yaml

from figures import Figure, write_figures
from flowpin.recipe import to_config
from flowpin.train.distributed import destroy, init_distributed, set_deterministic
from flowpin.train.loop import LossFn, OptimConfig, build_optimizer
from flowpin.train.plan import GiB, plan_recipe, render_plan
from flowpin.train.pretrain import lm_loss
from flowpin.train.schedule import ScheduleConfig
from flowpin.train.transformer import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params"
MiB = 1 << 20
PAPER_SCALE = (("pretrain_olmo3_7b", 512), ("pretrain_olmo3_32b", 1024), ("pretrain_multinode", 32))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


_WARM_UP = ModelConfig(
    num_layers=1,
    hidden_size=8,
    ffn_hidden_size=8,
    num_attention_heads=1,
    num_query_groups=1,
    vocab_size=128,
    max_sequence_length=8,
)
"""A model too small to matter: one step of it loads megatron's modules and torch's kernels before measuring."""


def _train(model_cfg: ModelConfig, tokens: torch.Tensor, loss_fn: LossFn, *, steps: int) -> None:
    model = build_model(model_cfg, device="cpu", seed=0)
    schedule = ScheduleConfig(decay="cosine", warmup_steps=0, peak_lr=1e-3, min_lr=1e-4, total_steps=steps)
    optimizer = build_optimizer(model, OptimConfig(schedule=schedule))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model, tokens)
        assert isinstance(loss, torch.Tensor)
        torch.autograd.backward(loss)
        optimizer.step()


def measure_tiny(steps: int, threads: int) -> tuple[int, int, int]:
    """(predicted bytes, measured peak RSS growth in bytes, micro-batch) for the tiny model at DP1."""
    plan = plan_recipe(PARAMS, "pretrain", [], gpus=1)
    model_cfg = to_config(ModelConfig, yaml.safe_load((PARAMS / "model" / "tiny.yaml").read_text()), where="model")
    batch, seq = plan.layout.micro_batch_size, plan.sequence_length
    init_distributed()
    set_deterministic(0, cpu_threads=threads)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, model_cfg.vocab_size, (batch, seq + 1), generator=gen)
    loss_fn = lm_loss(pad_id=1)
    _train(_WARM_UP, torch.randint(2, 128, (1, 9), generator=gen), loss_fn, steps=1)  # imports, kernels: not counted
    gc.collect()
    _reset_peak()
    before = _status_kib("VmRSS") * 1024
    _train(model_cfg, tokens, loss_fn, steps=steps)
    peak = _status_kib("VmHWM") * 1024
    destroy()
    return plan.total, peak - before, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps of the tiny model measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figures", help="also write the headline figures here as JSON (benchmarks/run_all.py)")
    args = parser.parse_args()

    for recipe, gpus in PAPER_SCALE:
        print(f"=== flowpin plan {recipe} --gpus {gpus} --gpu-memory 80GiB")
        print(render_plan(plan_recipe(PARAMS, recipe, [], gpus=gpus), 80 * GiB), end="\n\n")

    predicted, measured, batch = measure_tiny(args.steps, args.threads)
    ratio = predicted / measured
    print(f"=== tiny model (params/pretrain.yaml), data parallel 1, fp32, micro-batch {batch}, {args.steps} steps")
    print(f"{'per rank':<46} {'MiB':>8}")
    print(f"{'plan: weights + grads + Adam + activations + logits':<46} {predicted / MiB:>8.1f}")
    print(f"{'measured: peak RSS growth (VmHWM - RSS before)':<46} {measured / MiB:>8.1f}")
    print(f"{'ratio predicted / measured':<46} {ratio:>8.2f}")
    write_figures(
        args.figures,
        [
            Figure(
                "parallel",
                f"plan's predicted bytes per rank, tiny model DP1, {args.steps} steps",
                predicted / MiB,
                "MiB",
                "measured peak RSS growth",
                ratio,
            )
        ],
    )


if __name__ == "__main__":
    main()
