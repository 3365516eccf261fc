"""Stage 10, DPO: the SFT checkpoint prefers verified solutions over the pretrain checkpoint's wrong answers.

python stages/dpo.py                                   # params/dpo.yaml
python stages/dpo.py dpo.beta=0.5 dpo.pairs.sampling.temperature=0.8   # any override, recorded
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.constants import MODEL_CONFIG
from flowpin.post.dpo import DPOConfig, run_dpo
from flowpin.stage import stage_run
from flowpin.train.distributed import destroy, init_distributed

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="dpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    dist = init_distributed()
    try:
        inputs = ("synth", "tokenizer", "init", "weak")
        with stage_run("dpo", cfg, DPOConfig, root=ROOT, inputs=inputs, persistent_out=True) as run:
            result = run_dpo(
                run.recipe,
                synth_dir=run.input_dir("synth"),
                tokenizer_dir=run.input_dir("tokenizer"),
                init_dir=run.input_dir("init"),
                weak_dir=run.input_dir("weak"),
                run_dir=run.out_dir.parent,
                dist=dist,
                tracker=run.tracker,
                claim=run.run_claim(),  # the run key's code: this stage's dvc.yaml code deps
            )
            run.rec.output(run.out_dir / MODEL_CONFIG)
            for path in (*result.outputs, *(c.path for c in result.checkpoints)):  # pairs, then checkpoints
                run.rec.output(path)
            run.report = result.report
    finally:
        destroy()
    if not dist.is_main:  # rank 0 recorded the stage and reports it
        return
    report = result.report
    for kind, after in report["heldout"]["after"].items():
        before = report["heldout"]["before"][kind]
        print(
            f"{run.paths.manifest}: held-out {kind} pass@1 {before['pass_at_1']:.2f} → {after['pass_at_1']:.2f}, "
            f"solution loss {before['response_loss']:.3f} → {after['response_loss']:.3f}"
        )
    rewards = report["train_pair_rewards"]
    print(f"{report['pairs']['pairs']} pairs; after DPO, reward accuracy {rewards['reward_accuracy']:.2f} on them")


if __name__ == "__main__":
    main()
