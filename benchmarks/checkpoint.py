"""Checkpoint save/load cost against raw file I/O of the same bytes, measured side by side.

    python benchmarks/checkpoint.py [--model tiny] [--repeat 5]

Trains the model (``params/model/<name>.yaml``) for one step so AdamW has state, then times, best of
``--repeat``:

* ``save_checkpoint`` (safetensors files + canonical state.json, fsync, hashed back, atomic rename) vs a
  raw write of the same tensor bytes to one file with one fsync -- the floor any format has to pay;
* ``load_checkpoint`` (sizes, sha256 and every tensor's name/dtype/shape verified, then copied into the
  model and optimizer) vs a raw read of the checkpoint's files plus their sha256 -- what verification
  alone costs.

Page-cache I/O on whatever disk holds the temp dir: ratios, not absolute speeds, are the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from figures import Figure, write_figures
from flowpin.data.order import DataOrder
from flowpin.recipe import to_config
from flowpin.train.checkpoint import load_checkpoint, save_checkpoint
from flowpin.train.distributed import destroy, init_distributed, set_deterministic
from flowpin.train.loop import OptimConfig, TrainConfig, build_optimizer, train
from flowpin.train.pretrain import lm_loss
from flowpin.train.schedule import ScheduleConfig
from flowpin.train.transformer import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192


@dataclasses.dataclass(frozen=True)
class RandomTokens:
    """A pure batch source: seeded random tokens per step."""

    order: DataOrder
    seq_len: int

    def __call__(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        return torch.randint(2, VOCAB, (self.order.batch_size, self.seq_len), generator=gen)


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_write(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.detach().contiguous().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def raw_read_and_hash(directory: Path) -> None:
    for file in sorted(directory.iterdir()):
        hashlib.sha256(file.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--figures", help="also write the headline figures here as JSON (benchmarks/run_all.py)")
    args = parser.parse_args()

    init_distributed()
    set_deterministic(0, cpu_threads=2)
    plain = yaml.safe_load((ROOT / "params" / "model" / f"{args.model}.yaml").read_text())
    model_cfg = to_config(ModelConfig, plain, where="model").with_vocab(VOCAB)
    model = build_model(model_cfg, device="cpu", seed=0)
    schedule = ScheduleConfig(decay="cosine", warmup_steps=0, peak_lr=1e-3, min_lr=1e-4, total_steps=1)
    optim = OptimConfig(schedule=schedule)
    cfg = TrainConfig(steps=1, batch_size=2, seed=0, optim=optim, checkpoint_every=1)
    optimizer = build_optimizer(model, optim)
    order = DataOrder(n_sequences=64, dataset_digest="0" * 64, order_seed=0, batch_size=2)
    with tempfile.TemporaryDirectory(prefix="flowpin-bench-ckpt-") as tmp:
        work = Path(tmp)
        result = train(
            model=model,
            loss_fn=lm_loss(pad_id=1),
            data=RandomTokens(order=order, seq_len=64),
            cfg=cfg,
            run_dir=work / "run",
            optimizer=optimizer,
        )
        source = result.checkpoints[-1].path
        state = load_checkpoint(source, model=model, optimizer=optimizer, restore_rng_state=False)
        tensors = [*model.state_dict().values()]
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        n_bytes = sum(t.numel() * t.element_size() for t in tensors)

        save = best(lambda: save_checkpoint(work / "saved", state, model=model, optimizer=optimizer), args.repeat)
        write = best(lambda: raw_write(work / "raw.bin", tensors), args.repeat)
        fresh = build_model(model_cfg, device="cpu", seed=1)
        fresh_opt = build_optimizer(fresh, optim)
        load = best(
            lambda: load_checkpoint(source, model=fresh, optimizer=fresh_opt, restore_rng_state=False), args.repeat
        )
        read = best(lambda: raw_read_and_hash(source), args.repeat)
        on_disk = sum(f.stat().st_size for f in source.iterdir())
    destroy()

    params = sum(p.numel() for p in model.parameters())
    print(
        f"model {args.model}: {params / 1e6:.2f}M parameters, {n_bytes / 2**20:.1f} MiB of tensors, "
        f"checkpoint {on_disk / 2**20:.1f} MiB on disk; best of {args.repeat}"
    )
    print(f"{'operation':<44} {'seconds':>8} {'MiB/s':>8} {'ratio':>7}")
    rows = [
        ("raw write + fsync (baseline)", write, n_bytes, 1.0),
        ("save_checkpoint (safetensors, hash, atomic)", save, n_bytes, save / write),
        ("raw read + sha256 (baseline)", read, on_disk, 1.0),
        ("load_checkpoint (verify + copy in)", load, on_disk, load / read),
    ]
    for name, seconds, size, ratio in rows:
        print(f"{name:<44} {seconds:>8.3f} {size / 2**20 / seconds:>8.0f} {ratio:>6.2f}x")
    mib = f"{args.model} model, {n_bytes / 2**20:.1f} MiB of tensors"
    write_figures(
        args.figures,
        [
            Figure(
                "checkpoint",
                f"save_checkpoint, {mib}",
                n_bytes / 2**20 / save,
                "MiB/s",
                "raw write + fsync",
                save / write,
            ),
            Figure(
                "checkpoint",
                f"load_checkpoint (verified), {mib}",
                on_disk / 2**20 / load,
                "MiB/s",
                "raw read + sha256",
                load / read,
            ),
        ],
    )


if __name__ == "__main__":
    main()
