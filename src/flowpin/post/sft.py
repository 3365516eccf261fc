"""Stage 9, supervised fine-tuning: prompt -> worked solution, the loss on the response tokens only.

This module is SFT's spec builder (:func:`sft_spec`): the run itself is the training engine's
(:func:`flowpin.train.run.run_spec`, recorded by :func:`flowpin.train.entry.run_training_stage`), as for
every stage.

* **Examples.** Every training task of the recipe's kinds becomes ``[2, seq_len]`` ids + loss mask
  (:func:`flowpin.post.examples.solution_examples`: the prompt and a newline, the worked solution, EOS); an
  example longer than ``seq_len`` is refused, never truncated. The packed tensor's digest keys the data
  order, so the batch at any step is a pure function of the step (:class:`~flowpin.post.examples.ExampleBatches`)
  and a killed run resumes through the loop like any other.
* **Loss.** Mean next-token cross entropy over the response tokens of the batch
  (:func:`flowpin.post.examples.response_loss`): prompt and padding positions carry no gradient and no weight.
* **Held-out eval** (:func:`flowpin.post.heldout.heldout_eval`), before (the long-context checkpoint) and after
  the stage, on the first tasks of each held-out kind: greedy pass@1 graded by the verifier registry, answers
  in the ``Answer: N`` form, and the teacher-forced cross entropy of the reference solutions. DPO and RLVR
  report the same.

The run key (``runs/sft/run-key.json``, :mod:`flowpin.train.run_key`) names the loop config, the examples'
digest, the order seed, the initial weights' digest and the stage's code: checkpoints of any other setup are
refused rather than resumed, unless the user chose to archive or discard them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from flowpin.post.examples import example_batches, response_loss, solution_examples
from flowpin.post.heldout import HeldoutEvalConfig, heldout_eval, heldout_summary
from flowpin.post.inputs import TASK_KINDS, check_fits, check_kinds, init_checkpoint, split_tasks, weights_digest
from flowpin.post.prompts import open_vocab
from flowpin.recipe import check_int
from flowpin.train.loop import TrainConfig
from flowpin.train.run import read_model_config
from flowpin.train.spec import StageContext, TrainedRun, TrainingStage, TrainSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """The ``sft`` block of ``params/sft.yaml`` (the architecture comes from the init run's ``model.json``)."""

    loop: TrainConfig
    """Steps, batch size (examples per step), seed, optimizer and schedule, clipping, cadence."""
    order_seed: int
    """Seed of the example order (with the examples' digest and the batch size it fixes every batch)."""
    seq_len: int
    """Tokens per packed example; an example that does not fit is an error (raise it)."""
    kinds: tuple[str, ...] = TASK_KINDS
    """Training task kinds (all their train tasks are used)."""
    eval: HeldoutEvalConfig = dataclasses.field(default_factory=HeldoutEvalConfig)
    """Held-out pass@1 and solution loss before and after the stage."""
    threads: int = 2
    """torch intra-op threads (recorded: a different count can change results bitwise)."""

    def __post_init__(self) -> None:
        check_int(self.order_seed, "sft.order_seed", minimum=0, maximum=2**53 - 1)
        check_int(self.seq_len, "sft.seq_len", minimum=2, maximum=1 << 20)
        check_kinds(self.kinds, "sft.kinds")
        check_int(self.threads, "sft.threads", minimum=1, maximum=1024)


def sft_spec(cfg: SFTConfig, *, synth_dir: Path, tokenizer_dir: Path, init_dir: Path) -> TrainSpec:
    """Fine-tune the latest checkpoint of ``init_dir`` on ``synth_dir/train`` (see the module docstring)."""
    vocab = open_vocab(tokenizer_dir)
    model_cfg = read_model_config(init_dir)
    check_fits(model_cfg, vocab, cfg.seq_len, init_dir)
    examples = solution_examples(split_tasks(synth_dir / "train", cfg.kinds), vocab, seq_len=cfg.seq_len)
    heldout = split_tasks(synth_dir / "heldout", cfg.eval.kinds)
    batches = example_batches(examples, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size)
    init = init_checkpoint(init_dir, "init")
    max_len = model_cfg.max_sequence_length

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        return heldout_eval(model, heldout, vocab, cfg.eval, max_len=max_len)

    def report(trained: TrainedRun) -> dict[str, Any]:
        return {
            "examples": {
                "count": int(examples.shape[0]),
                "packed_digest": batches.order.dataset_digest,
                "kinds": list(cfg.kinds),
            },
            "epochs": cfg.loop.steps * cfg.loop.batch_size / int(examples.shape[0]),
            "heldout": {"before": trained.before, "after": trained.after},
        }

    return TrainSpec(
        model=model_cfg,
        loop=cfg.loop,
        threads=cfg.threads,
        batches=batches,
        loss=response_loss,
        key={
            "stage": "sft",
            "loop": cfg.loop.to_json(),
            "order_seed": cfg.order_seed,
            "examples": batches.order.dataset_digest,
            "init_weights": weights_digest(init.path),
        },
        init_dir=init_dir,
        evaluate=evaluate,
        curves=("loss",),
        report=report,
        summary=heldout_summary,
    )


def _build(cfg: SFTConfig, ctx: StageContext) -> TrainSpec:
    return sft_spec(
        cfg, synth_dir=ctx.inputs["synth"], tokenizer_dir=ctx.inputs["tokenizer"], init_dir=ctx.inputs["init"]
    )


SFT_STAGE = TrainingStage(block="sft", config=SFTConfig, inputs=("synth", "tokenizer", "init"), build=_build)
"""``stages/sft.py``'s stage: the ``sft`` block, its inputs and :func:`sft_spec`."""
