"""Held-out evaluation of a post-training stage: greedy pass@1 and the solution loss, before and after.

SFT, DPO and RLVR each grade their model on the first tasks of each held-out kind twice -- as it starts
(the upstream checkpoint) and as it ends -- through the training spec's evaluation hook
(:attr:`flowpin.train.spec.TrainSpec.evaluate`); :func:`heldout_eval` is that hook's work:

* **pass@1**: greedy decoding (temperature 0: no random numbers are drawn) stopped at EOS or a newline, each
  answer graded by the verifier registry eval uses (:func:`flowpin.post.verifiers.verify`);
* how many answers have the ``Answer: N`` form (:func:`flowpin.data.synth.extract_answer`);
* the teacher-forced cross entropy of the reference solutions (:func:`solution_loss`), a smoother signal
  than pass@1.

Which tasks: :func:`flowpin.post.inputs.first_per_kind`, the same rule as the eval stage's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flowpin.data.synth import Task, extract_answer
from flowpin.errors import DataError
from flowpin.post.examples import response_loss, solution_examples
from flowpin.post.inputs import check_kinds, first_per_kind
from flowpin.post.lm import SamplingConfig, generate
from flowpin.post.prompts import Vocab
from flowpin.post.verifiers import verify
from flowpin.recipe import check_int


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutEvalConfig:
    """Greedy pass@1 and solution loss on held-out tasks (the ``eval`` block of the SFT, DPO and RLVR recipes)."""

    kinds: tuple[str, ...] = ("arithmetic",)
    """Held-out task kinds to grade, each reported on its own."""
    tasks: int = 100
    """The first this many held-out tasks of each kind."""
    max_new_tokens: int = 48
    """Tokens generated at most per answer (a worked solution is at most ~40)."""
    batch_size: int = 64
    """Prompts decoded together (speed only; part of the recipe since batching may move the last bits)."""

    def __post_init__(self) -> None:
        check_kinds(self.kinds, "eval.kinds")
        check_int(self.tasks, "eval.tasks", minimum=1)
        check_int(self.max_new_tokens, "eval.max_new_tokens", minimum=1, maximum=4096)
        check_int(self.batch_size, "eval.batch_size", minimum=1)


def heldout_eval(
    model: torch.nn.Module, tasks: Sequence[Task], vocab: Vocab, cfg: HeldoutEvalConfig, *, max_len: int
) -> dict[str, Any]:
    """Per kind (first ``cfg.tasks`` of each): greedy pass@1, answers in the ``Answer: N`` format, and the
    teacher-forced cross entropy of the reference solutions' tokens (a smoother signal than pass@1)."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    stop = [vocab.eos_id, *vocab.newline_ids()]
    graded = first_per_kind(tasks, cfg.tasks)
    out: dict[str, Any] = {}
    for kind in cfg.kinds:
        chosen = [t for t in graded if t.kind == kind]
        if not chosen:
            raise DataError(f"eval.kinds: the held-out set has no {kind!r} task; rerun the synth stage")
        texts: list[str] = []
        for start in range(0, len(chosen), cfg.batch_size):
            part = chosen[start : start + cfg.batch_size]
            prompts = [vocab.prompt_ids(t.prompt) for t in part]
            rows = generate(model, prompts, cfg=sampling, stop_ids=stop, pad_id=vocab.pad_id, max_len=max_len)
            texts += [answer_text(vocab, row) for row in rows]
        correct = [verify(t, text) for t, text in zip(chosen, texts, strict=True)]
        out[kind] = {
            "tasks": len(chosen),
            "correct": sum(correct),
            "pass_at_1": sum(correct) / len(chosen),
            "formatted": sum(extract_answer(text) is not None for text in texts),
            "response_loss": solution_loss(model, chosen, vocab, max_len=max_len, batch_size=cfg.batch_size),
            "examples": [
                {"id": t.id, "output": text, "answer": t.answer, "correct": ok}
                for t, text, ok in list(zip(chosen, texts, correct, strict=True))[:3]
            ],
        }
    return out


def solution_loss(
    model: torch.nn.Module, tasks: Sequence[Task], vocab: Vocab, *, max_len: int, batch_size: int
) -> float:
    """Mean cross entropy of the reference solutions' tokens (and EOS) after their prompts, teacher-forced."""
    width = max(len(vocab.prompt_ids(t.prompt)) + len(vocab.response_ids(t.solution)) for t in tasks)
    examples = solution_examples(tasks, vocab, seq_len=min(width, max_len))
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0.0
    try:
        with torch.no_grad():
            for start in range(0, examples.shape[0], batch_size):
                part = examples[start : start + batch_size]
                loss, metrics = response_loss(model, part)
                total += float(loss) * metrics["response_tokens"]
                tokens += metrics["response_tokens"]
    finally:
        model.train(was_training)
    return total / tokens


def heldout_summary(manifest: str, report: Mapping[str, Any]) -> tuple[str, ...]:
    """One line per held-out kind of ``report["heldout"]``: pass@1 and solution loss, before -> after."""
    heldout = report["heldout"]
    return tuple(
        f"{manifest}: held-out {kind} pass@1 {heldout['before'][kind]['pass_at_1']:.2f} → {after['pass_at_1']:.2f}, "
        f"solution loss {heldout['before'][kind]['response_loss']:.3f} → {after['response_loss']:.3f}"
        for kind, after in heldout["after"].items()
    )


def answer_text(vocab: Vocab, ids: Sequence[int]) -> str:
    """A generated answer as text: up to EOS, its first line, stripped."""
    return vocab.decode(ids).split("\n", 1)[0].strip()
