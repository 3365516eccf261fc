"""Stage 10, DPO with a clear quality gap ("delta learning", OLMo 3): verified answers over a weak model's.

This module owns the preference pairs and the DPO objective, and builds the stage's training spec
(:func:`dpo_spec`); the run itself is the training engine's (:func:`flowpin.train.run.run_spec`), as for every
stage.

* **Pairs** (:func:`build_pairs`), generated while the spec is built: a seeded selection of training tasks
  (:func:`sample_tasks`: :func:`flowpin.data.order.keyed_permutation` of the recipe's ``pairs.seed``) is
  answered by the weaker checkpoint (``paths.inputs.weak``, the pretrain run) with seeded sampling (one
  ``torch.Generator`` seeded from ``pairs.seed``; temperature and top-k in the recipe), under the run's
  settings (the entry point prepared them). A sample becomes a *rejected* answer only when the verifier
  registry (:func:`flowpin.post.verifiers.verify`) rejects it; the *chosen* answer is the task's own
  worked solution, which verifies. Correct, empty and over-long samples are dropped and counted. Both
  sides are re-encoded from their text with the same layout (prompt, newline, answer, EOS), so the only
  difference the policy can learn is the answer. The pairs are written to ``<run_dir>/pairs.jsonl``
  (canonical JSON lines, the spec's file), a subject of the manifest.
* **Loss** (:func:`dpo_objective`): ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, averaged
  over the batch, each ``pi``/``ref`` the summed log-probability of a response's tokens (masks on the
  response only) under the policy and the frozen reference (the SFT checkpoint the policy starts from).
  Logged with the reward accuracy (chosen reward above rejected) and the mean reward margin.
* **Report**: the pair counts (and why samples were dropped), the loss, reward-accuracy and margin
  curves, the reward accuracy over all training pairs after the stage, and the held-out eval
  (:func:`flowpin.post.heldout.heldout_eval`) before and after.
* **Determinism.** The pairs are a pure function of the weak checkpoint, the tasks, the tokenizer and the
  ``pairs`` recipe; their packed tensor keys the data order. The run key names the loop config, ``beta``,
  the pairs' digest and the initial (= reference) weights' digest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flowpin.canonical import canonical_json
from flowpin.data.order import keyed_permutation
from flowpin.data.synth import Task
from flowpin.errors import DataError, RecipeError
from flowpin.post.examples import example_batches, used_width
from flowpin.post.heldout import HeldoutEvalConfig, answer_text, heldout_eval, heldout_summary
from flowpin.post.inputs import TASK_KINDS, check_fits, check_kinds, init_checkpoint, split_tasks, weights_digest
from flowpin.post.lm import SamplingConfig, generate, masked_logprob_sum
from flowpin.post.prompts import Vocab, open_vocab, pack_example
from flowpin.post.verifiers import verify
from flowpin.recipe import check_float, check_int
from flowpin.train.loop import LossFn, TrainConfig
from flowpin.train.run import load_weights, read_model_config
from flowpin.train.spec import StageContext, TrainedRun, TrainingStage, TrainSpec

PAIRS_FILE = "pairs.jsonl"
"""``<run_dir>/pairs.jsonl``: the preference pairs the stage trained on."""


# --- config ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairsConfig:
    """How the preference pairs are generated (the ``pairs`` block of ``params/dpo.yaml``)."""

    seed: int
    """Seeds the selection of training tasks and the weak model's sampler (a ``torch.Generator``)."""
    prompts: int
    """Training tasks the weak model answers; those it gets wrong become pairs."""
    kinds: tuple[str, ...] = TASK_KINDS
    """Task kinds to draw the prompts from."""
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    """The weak model's sampling (temperature, top-k, new tokens at most)."""
    batch_size: int = 64
    """Prompts sampled together (part of the recipe: the generator's draws follow the batches)."""

    def __post_init__(self) -> None:
        check_int(self.seed, "dpo.pairs.seed", minimum=0, maximum=2**63 - 1)
        check_int(self.prompts, "dpo.pairs.prompts", minimum=1)
        check_kinds(self.kinds, "dpo.pairs.kinds")
        check_int(self.batch_size, "dpo.pairs.batch_size", minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """The ``dpo`` block of ``params/dpo.yaml`` (the architecture comes from the SFT run's ``model.json``)."""

    loop: TrainConfig
    """Steps, batch size (pairs per step), seed, optimizer and schedule, clipping, cadence."""
    order_seed: int
    """Seed of the pair order (with the pairs' digest and the batch size it fixes every batch)."""
    beta: float
    """DPO's inverse temperature: how far the policy may move from the reference (> 0)."""
    seq_len: int
    """Tokens per packed response; a chosen answer that does not fit is an error, a rejected one is dropped."""
    pairs: PairsConfig
    """How the pairs are generated."""
    eval: HeldoutEvalConfig = dataclasses.field(default_factory=HeldoutEvalConfig)
    """Held-out pass@1 and solution loss before and after the stage."""
    threads: int = 2
    """torch intra-op threads (recorded: a different count can change results bitwise)."""

    def __post_init__(self) -> None:
        check_int(self.order_seed, "dpo.order_seed", minimum=0, maximum=2**53 - 1)
        if check_float(self.beta, "dpo.beta", minimum=0.0) == 0.0:
            raise RecipeError("dpo.beta: must be > 0 (0 would ignore the preferences); OLMo-style runs use 0.1-5")
        check_int(self.seq_len, "dpo.seq_len", minimum=2, maximum=1 << 20)
        check_int(self.threads, "dpo.threads", minimum=1, maximum=1024)


# --- pairs ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pair:
    """One preference pair: the task's verified solution over an incorrect answer of the weak model."""

    task_id: str
    prompt: str
    answer: str
    """The task's exact answer."""
    chosen: str
    """The task's worked solution (verifies)."""
    rejected: str
    """The weak model's sampled answer (does not verify)."""

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pairs:
    """What :func:`build_pairs` made, with the count of every sample it dropped and why."""

    pairs: tuple[Pair, ...]
    prompts: int
    """Tasks the weak model answered."""
    dropped: Mapping[str, int]
    """``correct`` (no quality gap), ``empty`` (no answer at all), ``too_long`` (over ``seq_len``)."""

    def jsonl(self) -> bytes:
        """The pairs as canonical JSON lines (what ``pairs.jsonl`` holds)."""
        return b"".join(canonical_json(p.to_json()) + b"\n" for p in self.pairs)

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "pairs": len(self.pairs),
            "dropped": dict(self.dropped),
            "weak_pass_rate": self.dropped["correct"] / self.prompts,
        }


def sample_tasks(tasks: Sequence[Task], count: int, seed: int) -> list[Task]:
    """``count`` tasks (all, if fewer) in a seeded selection, kept in dataset order (the prompts of the pairs)."""
    key = canonical_json({"purpose": "flowpin.dpo.prompts", "seed": seed})
    picked = sorted(int(i) for i in keyed_permutation(len(tasks), key)[:count])
    return [tasks[i] for i in picked]


def build_pairs(
    weak: torch.nn.Module, tasks: Sequence[Task], vocab: Vocab, cfg: PairsConfig, *, seq_len: int, max_len: int
) -> Pairs:
    """Sample one answer per selected task from ``weak``; keep the incorrect ones as rejected answers."""
    selected = sample_tasks(tasks, cfg.prompts, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    stop = [vocab.eos_id, *vocab.newline_ids()]
    pairs: list[Pair] = []
    dropped = {"correct": 0, "empty": 0, "too_long": 0}
    for start in range(0, len(selected), cfg.batch_size):
        part = selected[start : start + cfg.batch_size]
        prompts = [vocab.prompt_ids(t.prompt) for t in part]
        rows = generate(
            weak, prompts, cfg=cfg.sampling, stop_ids=stop, pad_id=vocab.pad_id, max_len=max_len, generator=generator
        )
        for task, prompt, row in zip(part, prompts, rows, strict=True):
            text = answer_text(vocab, row)
            if verify(task, text):
                dropped["correct"] += 1
            elif not text:
                dropped["empty"] += 1
            elif len(prompt) + len(vocab.response_ids(text)) > seq_len:
                dropped["too_long"] += 1
            else:
                pairs.append(
                    Pair(task_id=task.id, prompt=task.prompt, answer=task.answer, chosen=task.solution, rejected=text)
                )
    return Pairs(pairs=tuple(pairs), prompts=len(selected), dropped=dropped)


def pair_examples(pairs: Sequence[Pair], vocab: Vocab, *, seq_len: int) -> torch.Tensor:
    """``[N, 4, seq_len]``: chosen ids, chosen mask, rejected ids, rejected mask (masks on the responses)."""
    if not pairs:
        raise DataError(
            "dpo: no preference pair survived (the weak model answered every selected task correctly, or not at "
            "all); raise dpo.pairs.prompts or the sampling temperature, or name a weaker paths.inputs.weak"
        )
    rows = []
    for pair in pairs:
        prompt = vocab.prompt_ids(pair.prompt)
        sides = [
            pack_example(
                prompt, vocab.response_ids(text), seq_len=seq_len, pad_id=vocab.pad_id, where=f"dpo.seq_len ({where})"
            )
            for text, where in ((pair.chosen, f"{pair.task_id}, chosen"), (pair.rejected, f"{pair.task_id}, rejected"))
        ]
        rows.append(torch.cat(sides))
    return torch.stack(rows)


# --- the objective --------------------------------------------------------------------------------


def dpo_objective(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over ``[B]`` summed response log-probabilities, with reward accuracy and margin.

    The implicit rewards are ``beta * (policy - reference)``; a pair counts as accurate when the chosen
    reward is strictly above the rejected one (a tie, as at the start, is not).
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.detach().mean()),
        "chosen_reward": float(chosen.detach().mean()),
        "rejected_reward": float(rejected.detach().mean()),
    }
    return loss, metrics


def pair_logprobs(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probabilities ``([B], [B])`` of the chosen and rejected sides of ``[B, 4, T]``."""
    batch = batch[..., : used_width(batch)]
    ids = torch.cat([batch[:, 0], batch[:, 2]])
    masks = torch.cat([batch[:, 1], batch[:, 3]])
    both = masked_logprob_sum(model, ids, masks)
    return both[: batch.shape[0]], both[batch.shape[0] :]


def dpo_loss(reference: torch.nn.Module, *, beta: float) -> LossFn:
    """The loop's ``loss_fn``: DPO of the policy against the frozen ``reference`` on a ``[B, 4, T]`` batch."""

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        policy_chosen, policy_rejected = pair_logprobs(model, batch)
        with torch.no_grad():
            reference_chosen, reference_rejected = pair_logprobs(reference, batch)
        return dpo_objective(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta)

    return loss_fn


@torch.no_grad()
def pair_rewards(
    model: torch.nn.Module, reference: torch.nn.Module, examples: torch.Tensor, *, beta: float, chunk: int = 64
) -> dict[str, float]:
    """Reward accuracy and mean margin of ``model`` over every pair (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        margins = []
        for start in range(0, examples.shape[0], chunk):
            part = examples[start : start + chunk]
            pc, pr = pair_logprobs(model, part)
            rc, rr = pair_logprobs(reference, part)
            margins.append(beta * ((pc - rc) - (pr - rr)))
    finally:
        model.train(was_training)
    margin = torch.cat(margins)
    return {"reward_accuracy": float((margin > 0).float().mean()), "reward_margin": float(margin.mean())}


# --- the stage ------------------------------------------------------------------------------------


def dpo_spec(
    cfg: DPOConfig, *, synth_dir: Path, tokenizer_dir: Path, init_dir: Path, weak_dir: Path, device: str
) -> TrainSpec:
    """DPO from the latest checkpoint of ``init_dir`` (also the reference) on pairs against ``weak_dir``'s.

    Samples the pairs now (``device``: where the weak model runs), under the settings the entry point
    prepared for the run (:func:`flowpin.runtime.prepare_environment`).
    """
    vocab = open_vocab(tokenizer_dir)
    model_cfg = read_model_config(init_dir)
    check_fits(model_cfg, vocab, cfg.seq_len, init_dir)
    check_fits(read_model_config(weak_dir), vocab, cfg.seq_len, weak_dir)
    heldout = split_tasks(synth_dir / "heldout", cfg.eval.kinds)
    init, weak = init_checkpoint(init_dir, "init"), init_checkpoint(weak_dir, "weak")
    weak_model, weak_cfg = load_weights(weak.path, device=device, seed=cfg.loop.seed)
    pairs = build_pairs(
        weak_model,
        split_tasks(synth_dir / "train", cfg.pairs.kinds),
        vocab,
        cfg.pairs,
        seq_len=cfg.seq_len,
        max_len=weak_cfg.max_sequence_length,
    )
    del weak_model
    examples = pair_examples(pairs.pairs, vocab, seq_len=cfg.seq_len)
    batches = example_batches(examples, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size)
    reference, _ = load_weights(init.path, device=device, seed=cfg.loop.seed)
    max_len = model_cfg.max_sequence_length

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        return heldout_eval(model, heldout, vocab, cfg.eval, max_len=max_len)

    def report(trained: TrainedRun) -> dict[str, Any]:
        return {
            "weak": {"checkpoint": weak.path.name, "step": weak.step},
            "reference": {"checkpoint": init.path.name, "step": init.step},
            "beta": cfg.beta,
            "pairs": {**pairs.summary(), "file": PAIRS_FILE, "packed_digest": batches.order.dataset_digest},
            "epochs": cfg.loop.steps * cfg.loop.batch_size / len(pairs.pairs),
            "train_pair_rewards": pair_rewards(trained.model, reference, examples, beta=cfg.beta),
            "heldout": {"before": trained.before, "after": trained.after},
        }

    def summary(manifest: str, fields: Mapping[str, Any]) -> tuple[str, ...]:
        rewards = fields["train_pair_rewards"]
        after = f"{fields['pairs']['pairs']} pairs; after DPO, reward accuracy {rewards['reward_accuracy']:.2f} on them"
        return (*heldout_summary(manifest, fields), after)

    return TrainSpec(
        model=model_cfg,
        loop=cfg.loop,
        threads=cfg.threads,
        batches=batches,
        loss=dpo_loss(reference, beta=cfg.beta),
        key={
            "stage": "dpo",
            "loop": cfg.loop.to_json(),
            "order_seed": cfg.order_seed,
            "beta": cfg.beta,
            "pairs": batches.order.dataset_digest,
            "init_weights": weights_digest(init.path),  # also the reference's
        },
        init_dir=init_dir,
        evaluate=evaluate,
        curves=("loss", "reward_accuracy", "reward_margin"),
        report=report,
        files=((PAIRS_FILE, pairs.jsonl()),),
        summary=summary,
    )


def _build(cfg: DPOConfig, ctx: StageContext) -> TrainSpec:
    return dpo_spec(
        cfg,
        synth_dir=ctx.inputs["synth"],
        tokenizer_dir=ctx.inputs["tokenizer"],
        init_dir=ctx.inputs["init"],
        weak_dir=ctx.inputs["weak"],
        device=ctx.dist.device,
    )


DPO_STAGE = TrainingStage(block="dpo", config=DPOConfig, inputs=("synth", "tokenizer", "init", "weak"), build=_build)
"""``stages/dpo.py``'s stage: the ``dpo`` block, its inputs and :func:`dpo_spec`."""
