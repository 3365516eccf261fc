"""What the CPU kernel pins decide: the same training steps under each pin setting, side by side.

    python benchmarks/cpu_isa.py [--steps 20] [--repeat 2]

Trains the reference model (``params/model/tiny.yaml``, 2 threads, fp32) for ``--steps`` AdamW steps on
seeded random tokens, each variant in a fresh process (torch, MKL and oneDNN read their pins once, at
first use), and prints per variant: the ATen capability in use, the sha256 of the final weights, whether
they equal the pinned run's bit for bit, and the seconds per step over the unpinned run's (the cost of
the pins). Variants:

* ``pinned``: the reference flow's pins (``hydra.job.env_set`` in ``params/common/hydra.yaml``), twice
  (run-to-run equality);
* ``unpinned``: none set (each library picks kernels by the CPU it finds: what the record used before);
* ``aten-default``: ATen's portable kernels (``ATEN_CPU_CAPABILITY=default``), MKL and oneDNN pinned;
* ``mkl-unpinned``: ATen and oneDNN pinned, MKL free to pick its branch;
* ``avx512``: every library on AVX-512 -- only on a CPU that has ``avx512f``.

The question the pins answer is whether an AVX-512 machine reproduces an AVX2 machine's record bit for
bit: run this script on both and compare the ``pinned`` digests (they must be equal). On an AVX2-only
machine it can show that each pin changes the bits (so the pins decide which kernels run) and that the
pinned run repeats itself; it cannot show the cross-ISA equality, and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from figures import Figure, write_figures

ROOT = Path(__file__).resolve().parents[1]
PINS = {
    str(k): str(v) for k, v in yaml.safe_load((ROOT / "params/common/hydra.yaml").read_text())["job"]["env_set"].items()
}
ISA_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def variants(has_avx512: bool) -> dict[str, dict[str, str]]:
    out = {
        "pinned": dict(PINS),
        "pinned (again)": dict(PINS),
        "unpinned": {},
        "aten-default": {**PINS, "ATEN_CPU_CAPABILITY": "default"},
        "mkl-unpinned": {k: v for k, v in PINS.items() if k != "MKL_CBWR"},
    }
    if has_avx512:
        out["avx512"] = {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    return out


def worker(steps: int) -> None:
    """One variant (this process's environment holds its pins): train, print JSON with digest and time."""
    import torch

    from flowpin.environment import check_cpu_pins
    from flowpin.recipe import to_config
    from flowpin.train.distributed import destroy, init_distributed, set_deterministic
    from flowpin.train.loop import OptimConfig, build_optimizer
    from flowpin.train.pretrain import lm_loss
    from flowpin.train.schedule import ScheduleConfig
    from flowpin.train.transformer import ModelConfig, build_model

    init_distributed()
    set_deterministic(0, cpu_threads=2)
    plain = yaml.safe_load((ROOT / "params" / "model" / "tiny.yaml").read_text())
    model = build_model(to_config(ModelConfig, plain, where="model").with_vocab(8192), device="cpu", seed=0)
    optimizer = build_optimizer(model, OptimConfig(schedule=ScheduleConfig(peak_lr=1e-3, total_steps=steps)))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    loss_fn = lm_loss(pad_id=1)
    start = time.perf_counter()
    for step in range(steps):
        batch = torch.randint(2, 8192, (8, 256), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_fn(model, batch))
        optimizer.step()
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if isinstance(tensor, torch.Tensor):
            digest.update(name.encode() + b"\0" + tensor.detach().contiguous().numpy().tobytes())
    capability = check_cpu_pins()  # refuses a pin that is not in effect
    destroy()
    print(json.dumps({"capability": capability, "digest": digest.hexdigest(), "seconds": seconds}))


@dataclasses.dataclass(frozen=True)
class Run:
    """What one variant's worker process reported."""

    capability: str
    digest: str
    seconds: float


def run_variant(pins: dict[str, str], steps: int) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in ISA_VARS}
    env.update(pins)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"variant {pins} failed:\n{proc.stderr[-2000:]}")
    return Run(**json.loads(proc.stdout.strip().splitlines()[-1]))


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="time each variant this many times (best kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--figures", help="also write the headline figures here as JSON (benchmarks/run_all.py)")
    args = parser.parse_args()
    if args.worker:
        worker(args.steps)
        return
    flags = cpu_flags()
    has_avx512 = "avx512f" in flags
    results: dict[str, Run] = {}
    for name, pins in variants(has_avx512).items():
        runs = [run_variant(pins, args.steps) for _ in range(args.repeat)]
        if len({r.digest for r in runs}) != 1:
            raise SystemExit(f"variant {name}: repeated runs differ: {[r.digest for r in runs]}")
        results[name] = dataclasses.replace(runs[0], seconds=min(r.seconds for r in runs))
    pinned, unpinned = results["pinned"], results["unpinned"]
    print(f"tiny model, {args.steps} steps of 8 x 256 tokens, 2 threads, fp32; pins: {PINS}")
    print(
        f"{'variant':<16} {'ATen kernels':<13} {'final weights sha256':<20} {'= pinned':<9} {'s/step':>7} {'ratio':>7}"
    )
    for name, r in results.items():
        same = "yes" if r.digest == pinned.digest else "no"
        per_step = r.seconds / args.steps
        ratio = r.seconds / unpinned.seconds
        print(f"{name:<16} {r.capability:<13} {r.digest[:16] + '…':<20} {same:<9} {per_step:>7.3f} {ratio:>6.2f}x")
    if not has_avx512:
        simd = " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "sse"))))
        print(
            f"this CPU has no AVX-512 ({simd}): whether an AVX-512 machine reproduces the pinned digest "
            f"{pinned.digest[:16]}… is NOT measured here; run this script there and compare"
        )
    write_figures(
        args.figures,
        [
            Figure(
                benchmark="cpu_isa",
                measure=f"tiny model step, CPU kernels pinned ({', '.join(f'{k}={v}' for k, v in PINS.items())})",
                value=pinned.seconds / args.steps,
                unit="s/step",
                baseline="the same steps unpinned (kernels picked by CPU)",
                ratio=pinned.seconds / unpinned.seconds,
            )
        ],
    )


if __name__ == "__main__":
    main()
