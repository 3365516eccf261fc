"""Training step time with tracking off vs ``metrics.jsonl`` vs ``metrics.jsonl`` + Aim, side by side.

    python benchmarks/tracking.py [--model tiny] [--steps 10] [--repeat 8] [--warmup 2] [--log-every 1]

Trains the model (``params/model/<name>.yaml``, fp32 on the CPU) from the same seed on the same seeded
random tokens once per mode per repeat, the modes interleaved (their order rotates each repeat, so drift in
the machine's load hits every mode alike):

* ``off``: :func:`flowpin.train.loop.train` with no tracker (the loop's :class:`NullTracker`);
* ``jsonl``: :func:`flowpin.train.run.train_loop` as a stage calls it with tracking off (``metrics.jsonl``);
* ``jsonl+aim``: the same with the stage's Aim run (``train_loop(..., tracker=run.tracker)``), one Aim run
  per training run, in a scratch repository.

A step's time is the interval between the loop's requests for consecutive batches (forward, backward,
optimizer, and the tracker calls of that step); the first ``--warmup`` steps of each run and the last
(the checkpoint) are not counted. ``--log-every 1`` (the default) logs every step: the worst case for
tracking (recipes log every 10). The figures: per mode, the median step time over every repeat and its
ratio to ``off``; and, robust to load that comes and goes on a shared machine, the median over repeats
of each repeat's own ratio (its mode's median step over its ``off`` median: a paired comparison). The
time spent inside the Aim tracker's calls is also measured directly, as a share of a step. The one-off
costs of Aim -- importing it and opening a run, once per stage -- are printed apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from figures import Figure, write_figures
from flowpin.data.order import DataOrder
from flowpin.recipe import to_config
from flowpin.tracking import JsonlTracker
from flowpin.tracking.aim import AimTracker
from flowpin.train import megatron_cpu
from flowpin.train.distributed import destroy, init_distributed, set_deterministic
from flowpin.train.loop import ExtraRng, OptimConfig, TrainConfig, train
from flowpin.train.pretrain import lm_loss
from flowpin.train.run import train_loop
from flowpin.train.schedule import ScheduleConfig
from flowpin.train.transformer import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192
MODES = ("off", "jsonl", "jsonl+aim")


@dataclasses.dataclass(frozen=True)
class StampedTokens:
    """Seeded random tokens per step; records when each batch is asked for (a step boundary)."""

    order: DataOrder
    seq_len: int
    stamps: list[float]

    def __call__(self, step: int) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        gen = torch.Generator().manual_seed(step)
        return torch.randint(2, VOCAB, (self.order.batch_size, self.seq_len), generator=gen)


class TimedTracker:
    """Forwards to ``inner`` and adds up the seconds spent in its calls."""

    def __init__(self, inner: AimTracker) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    @property
    def run_id(self) -> str:
        return self.inner.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        start = time.perf_counter()
        self.inner.log_params(params)
        self.seconds += time.perf_counter() - start

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        start = time.perf_counter()
        self.inner.log_metrics(step, metrics, context)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def close(self) -> None:
        self.inner.close()


def jsonl_call_seconds(path: Path, calls: int = 200) -> float:
    """Seconds per :class:`JsonlTracker` call with the loop's metrics (a line, flushed)."""
    metrics = {"loss": 7.5, "grad_norm": 1.25, "lr": 1e-3, "tokens_per_s": 5012.5, "tokens_seen": 204800}
    with JsonlTracker(path) as tracker:
        start = time.perf_counter()
        for step in range(calls):
            tracker.log_metrics(step, metrics, {"subset": "train"})
        return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--repeat", type=int, default=8, help="runs per mode (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each run not timed")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show-runs", action="store_true", help="also print each run's median step time")
    parser.add_argument("--figures", help="also write the headline figures here as JSON (benchmarks/run_all.py)")
    args = parser.parse_args()
    if args.steps < args.warmup + 2:
        parser.error("--steps must exceed --warmup by at least 2 (the last step is not timed)")

    init_distributed()
    set_deterministic(0, cpu_threads=args.threads)
    plain = yaml.safe_load((ROOT / "params" / "model" / f"{args.model}.yaml").read_text())
    model_cfg = to_config(ModelConfig, plain, where="model").with_vocab(VOCAB)
    schedule = ScheduleConfig(decay="cosine", warmup_steps=0, peak_lr=1e-3, min_lr=1e-4, total_steps=args.steps)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=0,
        optim=OptimConfig(schedule=schedule),
        log_every=args.log_every,
        checkpoint_every=args.steps,
    )
    order = DataOrder(n_sequences=4096, dataset_digest="0" * 64, order_seed=0, batch_size=args.batch_size)
    extra_rng = ExtraRng(capture=megatron_cpu.rng_tracker_states, restore=megatron_cpu.set_rng_tracker_states)
    step_times: dict[str, list[list[float]]] = {mode: [] for mode in MODES}  # [repeat][step]
    aim_seconds, aim_calls, opens = 0.0, 0, []

    start = time.perf_counter()
    importlib.import_module("aim.sdk.run")  # what the first stage run of a process pays, measured apart

    import_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="flowpin-bench-tracking-") as tmp:
        work = Path(tmp)
        for r in range(args.repeat):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                stamps: list[float] = []
                data = StampedTokens(order=order, seq_len=args.seq_len + 1, stamps=stamps)
                model = build_model(model_cfg, device="cpu", seed=0)
                run_dir = work / f"{mode.replace('+', '-')}-{r}"
                loss_fn = lm_loss(pad_id=1)
                if mode == "off":
                    train(model=model, loss_fn=loss_fn, data=data, cfg=cfg, run_dir=run_dir, extra_rng=extra_rng)
                elif mode == "jsonl":
                    train_loop(model, cfg, batches=data, loss_fn=loss_fn, run_dir=run_dir)
                else:
                    start = time.perf_counter()
                    aim_run = AimTracker(work / "aim", experiment="bench", name=f"r{r}", context={"stage": "bench"})
                    opens.append(time.perf_counter() - start)
                    timed = TimedTracker(aim_run)
                    try:
                        train_loop(model, cfg, batches=data, loss_fn=loss_fn, run_dir=run_dir, tracker=timed)
                    finally:
                        timed.close()
                    aim_seconds, aim_calls = aim_seconds + timed.seconds, aim_calls + timed.calls
                step_times[mode].append([b - a for a, b in itertools.pairwise(stamps)][args.warmup :])
        jsonl_per_call = jsonl_call_seconds(work / "calls.jsonl")
    destroy()

    params = sum(p.numel() for p in model.parameters())
    every = {mode: [t for run in runs for t in run] for mode, runs in step_times.items()}
    median = {mode: statistics.median(times) for mode, times in every.items()}
    paired = {
        mode: statistics.median(
            statistics.median(run) / statistics.median(base)
            for run, base in zip(step_times[mode], step_times["off"], strict=True)
        )
        for mode in MODES
    }
    print(
        f"model {args.model}: {params / 1e6:.2f}M parameters, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.threads} threads, log every {args.log_every} step(s); {args.repeat} run(s) of {args.steps} steps "
        f"per mode, interleaved; {len(every['off'])} timed steps per mode"
    )
    print(f"{'mode':<12} {'median s/step':>14} {'min s/step':>11} {'ratio':>8} {'paired ratio':>13}")
    for mode in MODES:
        print(
            f"{mode:<12} {median[mode]:>14.4f} {min(every[mode]):>11.4f} {median[mode] / median['off']:>7.4f}x "
            f"{paired[mode]:>12.4f}x"
        )
    if args.show_runs:
        for mode in MODES:
            print(f"{mode:<12} per run: " + " ".join(f"{statistics.median(run):.3f}" for run in step_times[mode]))
    per_call = aim_seconds / max(aim_calls, 1)
    print(
        f"overhead vs off (paired): jsonl {100 * (paired['jsonl'] - 1):+.2f}%, "
        f"jsonl+aim {100 * (paired['jsonl+aim'] - 1):+.2f}% (target < 2%); "
        f"time inside the trackers per log call: Aim {1000 * per_call:.3f} ms = "
        f"{100 * per_call / args.log_every / median['off']:.3f}% of a step, metrics.jsonl "
        f"{1000 * jsonl_per_call:.3f} ms = {100 * jsonl_per_call / args.log_every / median['off']:.3f}%"
    )
    print(
        f"once per stage (not per step): import aim {import_seconds:.2f} s, open an Aim run "
        f"{statistics.median(opens):.2f} s (median of {len(opens)})"
    )
    steps = f"{args.model} model, log every {args.log_every} step(s)"
    write_figures(
        args.figures,
        [
            Figure(
                "tracking",
                f"training step with metrics.jsonl, {steps}",
                median["jsonl"],
                "s/step",
                "tracking off (paired)",
                paired["jsonl"],
                "<= 1.02",
            ),
            Figure(
                "tracking",
                f"training step with metrics.jsonl + Aim, {steps}",
                median["jsonl+aim"],
                "s/step",
                "tracking off (paired)",
                paired["jsonl+aim"],
                "<= 1.02",
            ),
            Figure(
                "tracking",
                "time inside the Aim tracker per logged step",
                1000 * per_call,
                "ms",
                "a training step, tracking off",
                per_call / args.log_every / median["off"],
            ),
        ],
    )


if __name__ == "__main__":
    main()
