"""Stage 11, RLVR: GRPO-style reinforcement learning with verifiable rewards.

This module owns the on-policy step and builds the stage's training spec (:func:`rlvr_spec`); the run itself
is the training engine's (:func:`flowpin.train.run.run_spec`), as for every stage, so a killed run resumes
through the loop and ends on the same bytes as an uninterrupted one.

* **Prompts** (:func:`admitted_tasks`): the training tasks of the recipe's kinds, filtered to those the
  policy can sometimes solve (operation count, operators, answer size). A task every sample fails, or
  every sample solves, has zero group variance and teaches nothing, so the filter decides how much of
  each step carries signal.
* **Batches** (:class:`PromptBatches`): the batch of step ``s`` is a pure function of ``s`` -- the prompts
  of a seeded :class:`~flowpin.data.order.DataOrder` over the selected tasks, as ``[B, 2, P]`` int64: row 0
  the prompt ids (right-padded), row 1 ``[task index, sampling seed, prompt length, 0...]``. The sampling
  seed of row ``i`` is :func:`sample_seed` of (``loop.seed``, step, ``i``).
* **Loss** (:class:`GRPOLoss`): ``K`` samples per prompt from the policy as it is at that step
  (:func:`flowpin.post.lm.generate`, one ``torch.Generator`` seeded from the rows' seeds -- weights and
  seeds are restored exactly on resume, so the samples are too), each graded by a verifier
  (:mod:`flowpin.post.verifiers`); group-normalised advantages ``(r - mean) / (std + eps)`` per prompt
  (:func:`group_advantages`: a group whose samples all agree gets zero); the policy-gradient loss
  ``-mean(A * logp / len)`` over every sample (``logp``: the summed log-probability of its response
  tokens under the unscaled logits), plus ``kl_coef`` times the k3 estimate of KL(policy || reference)
  per response token, the reference being the frozen init checkpoint. One optimizer step per batch, so
  samples drawn at temperature 1 are exactly on-policy (the PPO ratio is 1 and needs no clipping).
* **Report**: the reward curve (every logged step), the mean reward over the first and the last quarter of
  the steps, KL to the reference, the share of groups with signal, the share of samples giving the step's
  most common answer (a reward earned by collapsing onto one frequent answer shows there, not in skill),
  and greedy pass@1 (with the solutions' loss) on the held-out tasks of the same selection before and
  after the stage.

The run key names the recipe, the selected tasks' digest and the initial (= reference) weights' digest:
checkpoints of any other setup are refused rather than resumed (:mod:`flowpin.train.run_key`). With data
parallelism each rank samples for its own rows with a generator seeded from those rows' seeds, so results
depend on the world size (as every data-parallel run's do).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowpin.canonical import canonical_json
from flowpin.constants import METRICS_FILE
from flowpin.data.order import DataOrder
from flowpin.data.synth import OPERATORS, Task, extract_answer
from flowpin.errors import DataError, RecipeError
from flowpin.post.examples import tensor_digest
from flowpin.post.heldout import HeldoutEvalConfig, heldout_eval
from flowpin.post.inputs import check_fits, check_kinds, init_checkpoint, split_tasks, weights_digest
from flowpin.post.lm import SamplingConfig, generate, token_logprobs
from flowpin.post.prompts import Vocab, open_vocab
from flowpin.post.verifiers import KIND_VERIFIERS, Verifier, get_verifier, verifier_for
from flowpin.recipe import check_float, check_int, to_plain
from flowpin.train.loop import TrainConfig
from flowpin.train.run import load_weights, read_metrics, read_model_config
from flowpin.train.spec import StageContext, TrainedRun, TrainingStage, TrainSpec

ADVANTAGE_EPS = 1e-6
"""Added to a group's reward standard deviation before dividing (GRPO's epsilon)."""
SEED_SCHEME = "flowpin.rlvr.sample/v1"
"""Names the rule that derives sampling seeds (:func:`sample_seed`); part of every seed."""
_OPERATION = re.compile(r" ([-+*/]) ")


# --- config ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskFilter:
    """Which tasks RLVR trains on (and grades pass@1 on): the ``tasks`` block of ``params/rlvr.yaml``."""

    kinds: tuple[str, ...] = ("arithmetic",)
    """Task kinds (``flowpin.data.synth.GENERATORS``)."""
    max_operations: int = 0
    """Most binary operations in a task's worked solution (``46 + 57 = 103.`` is one); 0: no limit."""
    operators: tuple[str, ...] = ()
    """Operators a task may use, a subset of ``+ - * /``; empty: any."""
    max_answer: int | None = None
    """Largest answer (as an integer) a task may have; ``None``: no limit."""

    def __post_init__(self) -> None:
        check_kinds(self.kinds, "rlvr.tasks.kinds")
        check_int(self.max_operations, "rlvr.tasks.max_operations", minimum=0)
        for i, op in enumerate(self.operators):
            if op not in OPERATORS:
                raise RecipeError(f"rlvr.tasks.operators[{i}]: {op!r} is not one of {' '.join(OPERATORS)}")
        if len(set(self.operators)) != len(self.operators):
            raise RecipeError(f"rlvr.tasks.operators: {list(self.operators)} lists an operator twice")
        if self.max_answer is not None:
            check_int(self.max_answer, "rlvr.tasks.max_answer", minimum=0)

    def admits(self, task: Task) -> bool:
        """Whether ``task`` is of a selected kind and within every limit."""
        if task.kind not in self.kinds:
            return False
        ops = operations(task)
        if self.max_operations and len(ops) > self.max_operations:
            return False
        if self.operators and not set(ops) <= set(self.operators):
            return False
        return self.max_answer is None or int(task.answer) <= self.max_answer


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLVRConfig:
    """The ``rlvr`` block of ``params/rlvr.yaml`` (the architecture comes from the init run's ``model.json``)."""

    loop: TrainConfig
    """Steps, batch size (*prompts* per step), seed (also of the sampling seeds), optimizer, cadence."""
    order_seed: int
    """Seed of the prompt order (with the selected tasks' digest and the batch size it fixes every batch)."""
    samples_per_prompt: int
    """K: samples drawn per prompt, the group whose rewards are normalised together (>= 2)."""
    sampling: SamplingConfig
    """How samples are drawn (temperature > 0; they end at EOS or a newline)."""
    tasks: TaskFilter = dataclasses.field(default_factory=TaskFilter)
    """Which training tasks are prompts; the held-out tasks of the same selection are graded for pass@1."""
    verifier: str | None = None
    """The reward: a verifier name (:data:`flowpin.post.verifiers.VERIFIERS`); ``None``: each task kind's own."""
    kl_coef: float = 0.0
    """Weight of the k3 KL(policy || reference) estimate in the loss (0: measured and reported only)."""
    eval: HeldoutEvalConfig = dataclasses.field(default_factory=HeldoutEvalConfig)
    """Greedy pass@1 (and solution loss) on the selected held-out tasks, before and after the stage."""
    threads: int = 2
    """torch intra-op threads (recorded: a different count can change results bitwise)."""

    def __post_init__(self) -> None:
        check_int(self.order_seed, "rlvr.order_seed", minimum=0, maximum=2**53 - 1)
        check_int(self.samples_per_prompt, "rlvr.samples_per_prompt", minimum=2, maximum=4096)
        if self.sampling.temperature == 0:
            raise RecipeError(
                "rlvr.sampling.temperature: 0 (greedy) makes the K samples of a prompt identical, so no group has "
                "any reward variance to learn from; use a temperature > 0 (e.g. 1.0)"
            )
        if self.verifier is not None:
            get_verifier(self.verifier, where="rlvr.verifier")
        check_float(self.kl_coef, "rlvr.kl_coef", minimum=0.0)
        outside = sorted(set(self.eval.kinds) - set(self.tasks.kinds))
        if outside:
            raise RecipeError(
                f"rlvr.eval.kinds: {outside} are not among rlvr.tasks.kinds {list(self.tasks.kinds)}; pass@1 is "
                "measured on the held-out tasks of the trained selection"
            )
        check_int(self.threads, "rlvr.threads", minimum=1, maximum=1024)


# --- prompts --------------------------------------------------------------------------------------


def operations(task: Task) -> list[str]:
    """The binary operators of ``task``'s worked solution, in order (``46 + 57 = 103. Answer: 103``: ``["+"]``)."""
    worked = task.solution.rsplit("Answer:", 1)[0]
    return _OPERATION.findall(worked)


def admitted_tasks(tasks: Sequence[Task], selection: TaskFilter, *, where: str) -> list[Task]:
    """The tasks ``selection`` admits, in their order; none at all is a :class:`DataError` naming ``where``."""
    chosen = [t for t in tasks if selection.admits(t)]
    if not chosen:
        raise DataError(
            f"{where}: rlvr.tasks admits none of its {len(tasks)} tasks; widen the filter (kinds, max_operations, "
            "operators, max_answer) or rerun the synth stage"
        )
    return chosen


def sample_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of row ``row`` of step ``step`` (53 bits of sha256 of the scheme and the three)."""
    key = canonical_json({"row": row, "scheme": SEED_SCHEME, "seed": seed, "step": step})
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 11


def prompt_table(tasks: Sequence[Task], vocab: Vocab) -> torch.Tensor:
    """``[N, P]`` int64: each task's prompt ids (prompt and newline), right-padded to the longest (``P >= 3``)."""
    prompts = [vocab.prompt_ids(t.prompt) for t in tasks]
    width = max(3, *(len(p) for p in prompts))
    table = torch.full((len(prompts), width), vocab.pad_id, dtype=torch.long)
    for i, ids in enumerate(prompts):
        table[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PromptBatches:
    """A :class:`~flowpin.train.loop.BatchSource` of prompts: step -> ``[B, 2, P]`` (see the module docstring)."""

    prompts: torch.Tensor
    """``[N, P]`` prompt ids (:func:`prompt_table`)."""
    lengths: torch.Tensor
    """``[N]`` prompt lengths."""
    order: DataOrder
    seed: int
    """The recipe seed sampling seeds derive from (``loop.seed``)."""

    def __call__(self, step: int) -> torch.Tensor:
        index = torch.tensor(self.order.batch(step), dtype=torch.long)
        batch = torch.zeros((len(index), 2, self.prompts.shape[1]), dtype=torch.long)
        batch[:, 0] = self.prompts[index]
        batch[:, 1, 0] = index
        batch[:, 1, 1] = torch.tensor([sample_seed(self.seed, step, i) for i in range(len(index))], dtype=torch.long)
        batch[:, 1, 2] = self.lengths[index]
        return batch


def prompt_batches(
    tasks: Sequence[Task], vocab: Vocab, *, order_seed: int, batch_size: int, seed: int
) -> PromptBatches:
    """Seeded prompt batches over ``tasks`` (each once per epoch, a fresh shuffle each epoch)."""
    table = prompt_table(tasks, vocab)
    lengths = torch.tensor([len(vocab.prompt_ids(t.prompt)) for t in tasks], dtype=torch.long)
    order = DataOrder(
        n_sequences=len(tasks),
        dataset_digest=tensor_digest(torch.cat([table, lengths[:, None]], dim=1)),
        order_seed=order_seed,
        batch_size=batch_size,
    )
    return PromptBatches(prompts=table, lengths=lengths, order=order, seed=seed)


# --- the GRPO objective ---------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """``[G, K]`` rewards -> ``(r - group mean) / (group std + eps)`` (population std; a uniform group gets 0)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def generator_seed(seeds: Sequence[int]) -> int:
    """One generator seed for the rows a process samples (53 bits of sha256 of their seeds)."""
    key = canonical_json({"rows": list(seeds), "scheme": SEED_SCHEME})
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 11


def pack_responses(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """``[R, 2, L]``: prompt + response ids right-padded (row 0) and a mask on the response tokens (row 1)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    out = torch.zeros((len(prompts), 2, width), dtype=torch.long)
    out[:, 0] = pad_id
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        out[i, 0, : len(p) + len(r)] = torch.tensor([*p, *r], dtype=torch.long)
        out[i, 1, len(p) : len(p) + len(r)] = 1
    return out


def reward_function(verifier: str | None) -> Verifier:
    """The reward of the recipe's ``verifier``: that verifier, or (``None``) the verifier of each task's kind."""
    if verifier is not None:
        return get_verifier(verifier, where="rlvr.verifier")

    def by_kind(task: Task, text: str) -> float:
        return verifier_for(task.kind)(task, text)

    return by_kind


@dataclasses.dataclass(frozen=True, kw_only=True)
class Groups:
    """What one step sampled: ``G`` prompts x ``K`` responses, packed, and their rewards."""

    packed: torch.Tensor
    """``[G*K, 2, L]`` (:func:`pack_responses`), group ``g``'s samples in rows ``g*K .. g*K+K-1``."""
    rewards: torch.Tensor
    """``[G, K]`` float32."""
    answers: tuple[str | None, ...]
    """Each response's final ``Answer:`` (:func:`flowpin.data.synth.extract_answer`; ``None``: no answer)."""

    def top_answer_share(self) -> float:
        """The share of responses giving the most common answer (near 1: one answer for every prompt)."""
        given = collections.Counter(a for a in self.answers if a is not None)
        return given.most_common(1)[0][1] / len(self.answers) if given else 0.0


def response_logprobs(model: torch.nn.Module, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[R, L-1]`` log-probabilities of the next tokens, ``[R, L-1]`` float mask on the response tokens)."""
    ids, mask = packed[:, 0], packed[:, 1, 1:].to(torch.float32)  # token t+1 is predicted at position t
    return token_logprobs(model, ids), mask


def grpo_objective(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, KL): ``-mean(A * sum(logp) / len) + kl_coef * KL``, KL the per-token k3 estimate against the reference.

    ``logp``/``ref_logp``/``mask`` are ``[R, L-1]`` (:func:`response_logprobs`), ``advantages`` ``[R]``. k3 is
    ``exp(r) - r - 1`` with ``r = ref - policy`` (>= 0, unbiased for KL(policy || reference) on policy samples),
    averaged over each response's tokens and then over responses.
    """
    lengths = mask.sum(dim=1).clamp(min=1.0)
    policy_gradient = -(advantages * (logp * mask).sum(dim=1) / lengths).mean()
    log_ratio = ref_logp - logp
    kl = (((torch.exp(log_ratio) - log_ratio - 1.0) * mask).sum(dim=1) / lengths).mean()
    return (policy_gradient + kl_coef * kl if kl_coef > 0 else policy_gradient), kl


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GRPOLoss:
    """``loss_fn(model, batch)`` of the training loop: sample, grade, normalise per group, policy gradient."""

    tasks: Sequence[Task]
    """The selected tasks (a batch's row 1 column 0 indexes them)."""
    vocab: Vocab
    sampling: SamplingConfig
    samples_per_prompt: int
    reward: Verifier
    """``reward(task, text)`` of one response (:func:`reward_function`)."""
    reference: torch.nn.Module
    """The frozen init model (KL is measured against it)."""
    kl_coef: float
    max_len: int
    """The model's context: a sample stops there."""

    def sample(self, model: torch.nn.Module, batch: torch.Tensor) -> Groups:
        """K responses to every prompt of ``batch`` (``[G, 2, P]``), graded; a pure function of weights and batch."""
        k = self.samples_per_prompt
        meta = batch[:, 1]
        tasks = [self.tasks[int(i)] for i in meta[:, 0]]
        prompts = [batch[i, 0, : int(n)].tolist() for i, n in enumerate(meta[:, 2])]
        rows = [p for p in prompts for _ in range(k)]
        generator = torch.Generator().manual_seed(generator_seed([int(s) for s in meta[:, 1]]))
        stop = [self.vocab.eos_id, *self.vocab.newline_ids()]
        responses = generate(
            model, rows, cfg=self.sampling, stop_ids=stop, pad_id=self.vocab.pad_id, max_len=self.max_len,
            generator=generator,
        )  # fmt: skip
        texts = [self.vocab.decode(r) for r in responses]
        rewards = [[float(self.reward(task, texts[g * k + j])) for j in range(k)] for g, task in enumerate(tasks)]
        return Groups(
            packed=pack_responses(rows, responses, self.vocab.pad_id),
            rewards=torch.tensor(rewards, dtype=torch.float32),
            answers=tuple(extract_answer(t) for t in texts),
        )

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        groups = self.sample(model, batch)
        advantages = group_advantages(groups.rewards).reshape(-1)
        logp, mask = response_logprobs(model, groups.packed)
        with torch.no_grad():
            ref_logp, _ = response_logprobs(self.reference, groups.packed)
        loss, kl = grpo_objective(logp, ref_logp, mask, advantages, self.kl_coef)
        spread = groups.rewards.std(dim=1, unbiased=False)
        return loss, {
            "reward": float(groups.rewards.mean()),
            "reward_std": float(spread.mean()),
            "signal": float((spread > 0).to(torch.float32).mean()),
            "kl": float(kl.detach()),
            "response_tokens": float(mask.sum(dim=1).mean()),
            "top_answer_share": groups.top_answer_share(),
        }


# --- the stage ------------------------------------------------------------------------------------


def quarter_means(curve: Sequence[Sequence[float]], steps: int) -> dict[str, float | None]:
    """Mean of a ``[[step, value], ...]`` curve over the first and the last quarter of ``steps`` steps."""
    quarter = max(1, steps // 4)
    first = [v for s, v in curve if s <= quarter]
    last = [v for s, v in curve if steps - quarter < s <= steps]
    return {
        "steps_per_quarter": float(quarter),
        "first": sum(first) / len(first) if first else None,
        "last": sum(last) / len(last) if last else None,
    }


def rlvr_spec(cfg: RLVRConfig, *, synth_dir: Path, tokenizer_dir: Path, init_dir: Path, device: str) -> TrainSpec:
    """RLVR from the latest checkpoint of ``init_dir`` (also the KL reference) on ``synth_dir/train``.

    ``device``: where the reference model runs.
    """
    vocab = open_vocab(tokenizer_dir)
    model_cfg = read_model_config(init_dir)
    train = admitted_tasks(split_tasks(synth_dir / "train", cfg.tasks.kinds), cfg.tasks, where=f"{synth_dir / 'train'}")
    heldout = admitted_tasks(
        split_tasks(synth_dir / "heldout", cfg.tasks.kinds), cfg.tasks, where=f"{synth_dir / 'heldout'}"
    )
    batches = prompt_batches(
        train, vocab, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size, seed=cfg.loop.seed
    )
    check_fits(model_cfg, vocab, int(batches.prompts.shape[1]) + 1, init_dir)  # a prompt and one token at least
    init = init_checkpoint(init_dir, "init")
    reference, _ = load_weights(init.path, device=device, seed=cfg.loop.seed)
    max_len = model_cfg.max_sequence_length

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        return heldout_eval(model, heldout, vocab, cfg.eval, max_len=max_len)

    def report(trained: TrainedRun) -> dict[str, Any]:
        rows = [m for m in read_metrics(trained.run_dir / METRICS_FILE) if m["step"] <= cfg.loop.steps]
        curve = [[m["step"], m["metrics"]["reward"]] for m in rows if "reward" in m["metrics"]]
        return {
            "reference": {"checkpoint": init.path.name, "step": init.step},
            "tasks": {
                "train": len(train),
                "heldout": len(heldout),
                "digest": batches.order.dataset_digest,
                "filter": to_plain(cfg.tasks),
                "verifier": cfg.verifier or {k: KIND_VERIFIERS[k] for k in cfg.tasks.kinds},
            },
            "samples_per_prompt": cfg.samples_per_prompt,
            "kl_coef": cfg.kl_coef,
            "epochs": cfg.loop.steps * cfg.loop.batch_size / len(train),
            "reward_quarters": quarter_means(curve, cfg.loop.steps),
            "heldout": {"before": trained.before, "after": trained.after},
        }

    return TrainSpec(
        model=model_cfg,
        loop=cfg.loop,
        threads=cfg.threads,
        batches=batches,
        loss=GRPOLoss(
            tasks=train,
            vocab=vocab,
            sampling=cfg.sampling,
            samples_per_prompt=cfg.samples_per_prompt,
            reward=reward_function(cfg.verifier),
            reference=reference,
            kl_coef=cfg.kl_coef,
            max_len=max_len,
        ),
        key={
            "stage": "rlvr",
            "recipe": to_plain(cfg),
            "prompts": batches.order.dataset_digest,
            "init_weights": weights_digest(init.path),  # also the reference's
        },
        init_dir=init_dir,
        evaluate=evaluate,
        curves=("reward", "kl", "signal", "top_answer_share", "response_tokens"),
        report=report,
        summary=_summary,
    )


def _summary(manifest: str, report: Mapping[str, Any]) -> tuple[str, ...]:
    quarters, passed = report["reward_quarters"], report["heldout"]
    lines = [f"{manifest}: mean reward {quarters['first']:.3f} (first quarter) → {quarters['last']:.3f} (last)"]
    for kind, after in passed["after"].items():
        lines.append(f"  held-out {kind} pass@1 {passed['before'][kind]['pass_at_1']:.2f} → {after['pass_at_1']:.2f}")
    return tuple(lines)


def _build(cfg: RLVRConfig, ctx: StageContext) -> TrainSpec:
    return rlvr_spec(
        cfg,
        synth_dir=ctx.inputs["synth"],
        tokenizer_dir=ctx.inputs["tokenizer"],
        init_dir=ctx.inputs["init"],
        device=ctx.dist.device,
    )


RLVR_STAGE = TrainingStage(block="rlvr", config=RLVRConfig, inputs=("synth", "tokenizer", "init"), build=_build)
"""``stages/rlvr.py``'s stage: the ``rlvr`` block, its inputs and :func:`rlvr_spec`."""
