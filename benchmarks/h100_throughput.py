"""Training throughput of OLMo-3-like models on one GPU: bf16 vs FP8, deterministic on vs off, side by side.

    python benchmarks/h100_throughput.py               # measure on the CUDA device (an H100 is the target)
    python benchmarks/h100_throughput.py --dry-run     # build and validate every config on CPU; measure nothing
    python benchmarks/h100_throughput.py --models olmo3_1b,olmo3_7b_8l --json reports/h100.json

Every variant of every model runs in its own subprocess, so that each starts from a fresh CUDA context with
its own environment (``CUBLAS_WORKSPACE_CONFIG`` and ``NCCL_ALGO`` only take effect before cuBLAS/NCCL
start, so they cannot be switched inside one process). A variant trains the model for ``--warmup`` steps,
then times ``--steps`` more (``torch.cuda.synchronize`` around them): forward, backward, grad clipping and
an AdamW step per step, as :func:`flowpin.train.loop.train` does them (``foreach`` AdamW, which the loop
documents as bitwise equal to its default). Batches are random token ids, drawn once on the GPU.

Variants (``--variants`` picks some):

* ``bf16`` -- the baseline: bf16 parameters and compute, non-deterministic kernels allowed
  (``NVTE_ALLOW_NONDETERMINISTIC_ALGO=1``, megatron ``deterministic_mode`` off, no
  ``torch.use_deterministic_algorithms``);
* ``bf16-det`` -- the same with :func:`flowpin.train.distributed.set_deterministic` before anything else
  (deterministic cuBLAS workspace, TE attention, torch algorithms) and :func:`flowpin.train.transformer.build_model`
  as training builds it;
* ``fp8-delayed`` / ``fp8-delayed-det`` -- FP8 ``hybrid`` (e4m3 forward, e5m2 gradients) through Transformer
  Engine with delayed scaling (amax history 16, ``max``);
* ``fp8-tensorwise`` / ``fp8-tensorwise-det`` -- FP8 ``hybrid`` with per-tensor current scaling.

FP8 is never claimed without being used: :func:`flowpin.train.transformer.check_precision` refuses it up front
when Transformer Engine is not importable (the variant is reported as skipped), the built model must pass
:func:`flowpin.train.transformer.effective_precision`, and after the warmup at least one Transformer Engine
module must report that it ran under FP8 (else the variant is reported as failed, with no numbers).

Model FLOPs per token (reported as ``model TFLOP/s`` = FLOPs per token x tokens/s):

    6 * N_matmul  +  sum over layers of 12 * (heads * head_dim) * keys(layer)

``N_matmul`` is every weight that enters a matrix multiply: per layer the fused QKV projection
``h * (heads + 2 * kv_heads) * head_dim``, the attention output ``heads * head_dim * h`` and the SwiGLU
``3 * h * ffn``, plus the output layer ``padded_vocab * h``; not the input embedding (a lookup) nor the
norms. ``6 * N`` is 2 FLOPs per multiply-add in the forward pass and twice that in the backward pass. The
attention term is ``Q K^T`` and ``softmax . V`` (2 x 2 FLOPs per query channel per key attended, forward)
times 3 for training, with ``keys(layer)`` the *mean* number of keys a query attends under the causal
mask: ``(s + 1) / 2`` for a full layer of sequence length ``s``, and ``mean_i min(i + 1, W)`` for a layer
with a ``W``-token sliding window -- what a kernel that skips masked blocks (flash attention) has to do.
PaLM's convention (``12 * L * heads * head_dim * s``, no causal saving) would count more; the dry run
prints both. No activation recomputation is counted (none is done). MFU is given against the dense bf16
peak of the device when it is a known H100/H200 part, for FP8 runs too (as is customary).

On a machine without CUDA (and without ``--dry-run``) it prints ``no CUDA device: nothing measured`` and
exits 0: no number is ever printed that was not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowpin.environment import probe_transformer_engine
from flowpin.errors import FlowpinError, PrecisionError
from flowpin.train.distributed import GPU_DETERMINISM_ENV
from flowpin.train.transformer import (
    ModelConfig,
    PrecisionConfig,
    check_precision,
    estimate_params,
    fp8_fields,
    layer_layout,
    to_transformer_config,
    window_pattern,
)

RESULT_MARKER = "H100_THROUGHPUT_RESULT "
"""Prefix of the one stdout line a variant subprocess reports on."""
SEED = 1234

# --- what is measured ---------------------------------------------------------------------------------------

# OLMo 3's architecture (params/model/olmo3_7b.yaml) scaled to one GPU at sequence length 4096, the
# sliding window scaled with it (OLMo 3: 4096 of 8192 -> 2048 of 4096; every 4th layer and the last full).
_OLMO3 = {
    "vocab_size": 100278,
    "vocab_multiple": 128,
    "max_sequence_length": 4096,
    "rotary_base": 500000.0,
    "sliding_window": 2048,
    "full_attention_every": 4,
    "qk_norm": True,
    "norm_eps": 1e-6,
    "dtype": "bf16",
}
MODELS: Mapping[str, ModelConfig] = {
    # OLMo-2-1B-like shape: ~1.5B parameters with the untied 100K-vocabulary embeddings.
    "olmo3_1b": ModelConfig(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=16,
        num_query_groups=16,
        **_OLMO3,  # type: ignore[arg-type]
    ),
    # The 7B's exact layer (width 4096, SwiGLU 11008, 32 heads) at 8 layers deep: ~2.4B parameters.
    "olmo3_7b_8l": ModelConfig(
        num_layers=8,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        num_query_groups=32,
        **_OLMO3,  # type: ignore[arg-type]
    ),
}
DEFAULT_MODELS = ("olmo3_1b",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """One column of the comparison."""

    name: str
    fp8_recipe: str | None
    """``None`` for bf16, else the Transformer Engine scaling recipe (``delayed`` / ``tensorwise``)."""
    deterministic: bool

    def precision(self) -> PrecisionConfig:
        if self.fp8_recipe is None:
            return PrecisionConfig()
        history = 16 if self.fp8_recipe == "delayed" else 1
        algo = "max" if self.fp8_recipe == "delayed" else "most_recent"
        return PrecisionConfig(
            fp8="hybrid", fp8_recipe=self.fp8_recipe, fp8_amax_history_len=history, fp8_amax_compute_algo=algo
        )

    def env(self) -> dict[str, str]:
        """Environment the subprocess starts with (before CUDA, cuBLAS or Transformer Engine start)."""
        if self.deterministic:
            return dict(GPU_DETERMINISM_ENV)
        return {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "1"}


VARIANTS: tuple[Variant, ...] = (
    Variant(name="bf16", fp8_recipe=None, deterministic=False),
    Variant(name="bf16-det", fp8_recipe=None, deterministic=True),
    Variant(name="fp8-delayed", fp8_recipe="delayed", deterministic=False),
    Variant(name="fp8-delayed-det", fp8_recipe="delayed", deterministic=True),
    Variant(name="fp8-tensorwise", fp8_recipe="tensorwise", deterministic=False),
    Variant(name="fp8-tensorwise-det", fp8_recipe="tensorwise", deterministic=True),
)
BASELINE = "bf16"
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4))
"""Dense bf16 peak by device-name substring (first match), from NVIDIA's datasheets (SXM unless named)."""


def model_config(model: str, variant: Variant) -> ModelConfig:
    return dataclasses.replace(MODELS[model], precision=variant.precision())


# --- FLOPs ----------------------------------------------------------------------------------------------


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that enter a matrix multiply (see the module docstring): layers plus the output layer."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.ffn_hidden_size
    return cfg.num_layers * per_layer + cfg.padded_vocab_size * h


def mean_keys(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends under the causal mask (with an optional ``window``)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0 .. W-1 see i + 1 keys, the remaining s - W see W keys
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token: ``dense`` (6 N_matmul), ``attention`` (causal/windowed), their ``total``,
    and ``attention_palm`` (the same term without causal or window savings, for comparison)."""
    q = cfg.num_attention_heads * cfg.head_dim
    attention = sum(
        12.0 * q * mean_keys(seq_len, cfg.sliding_window if windowed else None) for windowed in window_pattern(cfg)
    )
    dense = 6.0 * matmul_params(cfg)
    return {
        "dense": dense,
        "attention": attention,
        "total": dense + attention,
        "attention_palm": 12.0 * cfg.num_layers * q * seq_len,
    }


def bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


# --- one variant, in its own process (CUDA only) ------------------------------------------------------------


def _fp8_executed(model: torch.nn.Module) -> bool | None:
    """Whether Transformer Engine modules ran their last forward under FP8 (``None``: none reports it)."""
    flags = [
        m.fp8
        for m in model.modules()
        if type(m).__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine"))
        and isinstance(getattr(m, "fp8", None), bool)
    ]
    return any(flags) if flags else None


def _build(cfg: ModelConfig, variant: Variant) -> torch.nn.Module:
    """The model as training builds it; the non-deterministic baselines with megatron's deterministic_mode off."""
    from flowpin.train.transformer import build_model

    built: torch.nn.Module = build_model(cfg, device="cuda", seed=SEED, deterministic=variant.deterministic)
    return built


def measure(model_name: str, variant: Variant, *, micro_batch: int, warmup: int, steps: int) -> dict[str, Any]:
    """Train ``steps`` timed steps after ``warmup``; the numbers of one variant (run in a fresh process)."""
    from flowpin.train.distributed import destroy, init_distributed, set_deterministic
    from flowpin.train.loop import OptimConfig, build_optimizer
    from flowpin.train.schedule import ScheduleConfig
    from flowpin.train.transformer import effective_precision

    cfg = model_config(model_name, variant)
    check_precision(cfg, "cuda")  # FP8 without an importable Transformer Engine: PrecisionError, no numbers
    determinism = set_deterministic(SEED) if variant.deterministic else None
    if not variant.deterministic:
        torch.manual_seed(SEED)
    info = init_distributed()
    try:
        model = _build(cfg, variant)
        precision = effective_precision(model)  # raises if FP8 is asked for but not built in
        optimizer = build_optimizer(
            model, OptimConfig(schedule=ScheduleConfig(total_steps=1, peak_lr=1e-4), implementation="foreach")
        )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seq = cfg.max_sequence_length
        gen = torch.Generator(device="cuda").manual_seed(SEED)
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), device="cuda", generator=gen)
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        positions = torch.arange(seq, device="cuda").unsqueeze(0).expand(micro_batch, -1)
        model.train()
        losses: list[float] = []

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss: torch.Tensor = model(inputs, positions, None, labels=labels).float().mean()
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, foreach=False)
            optimizer.step()
            return loss.detach()

        for _ in range(warmup):
            losses.append(float(step()))
        fp8_ran = _fp8_executed(model)
        if cfg.precision.fp8 is not None and fp8_ran is False:
            raise PrecisionError(
                f"{variant.name}: the config asks for FP8 but no Transformer Engine module ran under FP8; "
                "refusing to report these numbers as FP8"
            )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        timed = [step() for _ in range(steps)]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses += [float(x) for x in timed]
        device = torch.cuda.get_device_name(torch.cuda.current_device())
        tokens_per_s = micro_batch * seq * steps / seconds
        flops = flops_per_token(cfg, seq)
        peak = bf16_peak(device)
        tflops = flops["total"] * tokens_per_s / 1e12
        return {
            "model": model_name,
            "variant": variant.name,
            "device": device,
            "world_size": info.world_size,
            "tokens_per_s_per_gpu": tokens_per_s,
            "model_tflops": tflops,
            "mfu_vs_bf16_peak": None if peak is None else tflops / peak,
            "bf16_peak_tflops": peak,
            "seconds": seconds,
            "steps": steps,
            "warmup": warmup,
            "micro_batch": micro_batch,
            "seq_len": seq,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "losses": losses,
            "all_finite": all(x == x and abs(x) != float("inf") for x in losses),
            "precision": precision,
            "fp8_executed": fp8_ran,
            "determinism": determinism,
            "torch": str(torch.__version__),
            "transformer_engine": probe_transformer_engine().get("version"),
        }
    finally:
        destroy()


# --- orchestration -----------------------------------------------------------------------------------------


def _run_child(model: str, variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO")}
    env.update(variant.env())
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant.name,
        "--models",
        model,
        "--micro-batch",
        str(args.micro_batch),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"model": model, "variant": variant.name, "error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"model": model, "variant": variant.name, "error": f"exit {proc.returncode}: " + "\n".join(tail)}


def _child(variant_name: str, model: str, args: argparse.Namespace) -> int:
    variant = next(v for v in VARIANTS if v.name == variant_name)
    try:
        result = measure(model, variant, micro_batch=args.micro_batch, warmup=args.warmup, steps=args.steps)
    except PrecisionError as exc:
        result = {"model": model, "variant": variant.name, "skipped": str(exc)}
    except (FlowpinError, RuntimeError, ValueError, AssertionError, torch.cuda.OutOfMemoryError) as exc:
        result = {"model": model, "variant": variant.name, "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_MARKER + json.dumps(result, sort_keys=True), flush=True)
    return 0


def _table(results: Sequence[dict[str, Any]]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        base = next((r for r in rows if r["variant"] == BASELINE and "tokens_per_s_per_gpu" in r), None)
        lines.append(f"\n{model}")
        lines.append(
            f"  {'variant':<20} {'tokens/s/GPU':>13} {'model TFLOP/s':>14} {'MFU':>6} {'vs bf16':>8} "
            f"{'mem GiB':>8}  precision"
        )
        for r in rows:
            if "tokens_per_s_per_gpu" not in r:
                why = r.get("skipped") or r.get("error") or "?"
                lines.append(f"  {r['variant']:<20} {'-- ' + ('skipped' if 'skipped' in r else 'FAILED'):>13}  {why}")
                continue
            ratio = f"x{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}" if base else "n/a"
            mfu = f"{100 * r['mfu_vs_bf16_peak']:.1f}%" if r["mfu_vs_bf16_peak"] is not None else "n/a"
            p = r["precision"]
            fp8 = f"fp8 {p['fp8']['format']}/{p['fp8']['recipe']}" if p["fp8"] else p["computeDtype"]
            lines.append(
                f"  {r['variant']:<20} {r['tokens_per_s_per_gpu']:>13.0f} {r['model_tflops']:>14.1f} {mfu:>6} "
                f"{ratio:>8} {r['max_memory_gib']:>8.1f}  {fp8}, {p['layerSpec']} spec"
                + ("" if r["all_finite"] else "  (NON-FINITE LOSS)")
            )
    return "\n".join(lines)


def dry_run(models: Sequence[str], variants: Sequence[Variant], args: argparse.Namespace) -> int:
    """Build every TransformerConfig on CPU (no weights, no process group) and print the plan."""
    te = probe_transformer_engine()
    cuda = torch.cuda.is_available()
    refusals: dict[str, None] = {}
    print("dry run: nothing is measured")
    print(f"  CUDA: {'yes' if cuda else 'no'}; Transformer Engine: {te}")
    print(f"  per variant: {args.warmup} warmup + {args.steps} timed steps, micro-batch {args.micro_batch}")
    for name in models:
        base = MODELS[name]
        seq = base.max_sequence_length
        flops = flops_per_token(base, seq)
        windowed = sum(window_pattern(base))
        print(
            f"\n{name}: {base.num_layers} layers, hidden {base.hidden_size}, ffn {base.ffn_hidden_size}, "
            f"{base.num_attention_heads} heads / {base.num_query_groups} kv, vocab {base.vocab_size} "
            f"(padded {base.padded_vocab_size}), seq {seq}, window {base.sliding_window} on {windowed} of "
            f"{base.num_layers} layers"
        )
        print(
            f"  parameters {estimate_params(base) / 1e9:.3f}B (matmul N {matmul_params(base) / 1e9:.3f}B); "
            f"tokens/step {args.micro_batch * seq}"
        )
        print(
            f"  FLOPs/token: 6N {flops['dense'] / 1e9:.2f} G + attention {flops['attention'] / 1e9:.2f} G "
            f"= {flops['total'] / 1e9:.2f} G (PaLM-style attention, no causal saving: "
            f"{flops['attention_palm'] / 1e9:.2f} G)"
        )
        assert len(layer_layout(base)) == base.num_layers
        for variant in variants:
            cfg = model_config(name, variant)
            precision = cfg.precision
            # megatron's own validation of the TransformerConfig the variant would train with: built for the
            # bf16 shape (to_transformer_config refuses FP8 where it cannot run), then with the FP8 fields.
            tc = to_transformer_config(dataclasses.replace(cfg, precision=PrecisionConfig()), device="cpu")
            tc = dataclasses.replace(tc, **fp8_fields(precision))
            try:
                check_precision(cfg, "cuda")
                verdict = "would run" if cuda else "needs CUDA"
            except PrecisionError as exc:
                refusals.setdefault(str(exc), None)
                verdict = "would be SKIPPED here (FP8 refused, see below)"
            env = " ".join(f"{k}={v}" for k, v in sorted(variant.env().items()))
            fp8 = "bf16" if tc.fp8 is None else f"fp8 {tc.fp8}/{tc.fp8_recipe} amax {tc.fp8_amax_history_len}"
            print(f"  {variant.name:<19} {fp8:<29} det={variant.deterministic!s:<5} [{env}] -> {verdict}")
    for reason in refusals:
        print(f"\nFP8 refused on this machine: {reason}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dry-run", action="store_true", help="build the configs on CPU and print the plan")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="comma list of variants")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per variant (default 900)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    names = [v for v in args.variants.split(",") if v]
    unknown += [v for v in names if v not in {x.name for x in VARIANTS}]
    if unknown or args.micro_batch < 1 or args.warmup < 1 or args.steps < 1:
        parser.error(f"unknown models/variants {unknown}" if unknown else "--micro-batch/--warmup/--steps must be >= 1")
    variants = [v for v in VARIANTS if v.name in names]

    if args.child:
        return _child(args.child, models[0], args)
    if args.dry_run:
        return dry_run(models, variants, args)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return 0
    results = []
    for model in models:
        for variant in variants:
            print(f"running {model} / {variant.name} ...", flush=True)
            results.append(_run_child(model, variant, args))
    print(_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
