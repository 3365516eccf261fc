"""Stage 12, eval: bits-per-byte and pass@1 of every stage's latest checkpoint in one table.

python stages/eval.py                                    # params/eval.yaml: all six stages
python stages/eval.py 'eval.stages=[pretrain,midtrain,longctx]' '~paths.inputs.sft' '~paths.inputs.dpo' \
    '~paths.inputs.rlvr'                                 # only the stages that have run
python stages/eval.py eval.tasks.per_kind=100            # any Hydra override, recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.manifest.resolve import python_stdlib_root, python_stdlib_uri
from flowpin.post.eval import run_eval
from flowpin.post.eval_config import DATA_ROLES, EvalConfig
from flowpin.post.eval_inputs import preflight, resolve_inputs
from flowpin.post.eval_report import MARKDOWN_NAME
from flowpin.recipe_schema import register_schema
from flowpin.stage import stage_run
from flowpin.tracking.aim import numeric_leaves
from flowpin.train.distributed import destroy, init_distributed, set_deterministic

ROOT = Path(__file__).resolve().parents[1]
register_schema("eval")  # the structured config params/*.yaml compose onto (schema/eval)


@hydra.main(config_path="../params", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    init_distributed()
    try:
        with stage_run("eval", cfg, EvalConfig, root=ROOT, inputs=DATA_ROLES, preflight=preflight(ROOT)) as run:
            stdlib, uri = python_stdlib_root(), python_stdlib_uri()
            run.rec.fileset("python-stdlib", base=stdlib, files=run.recipe.text.files, kind="dataset", uri=uri)
            run.rec.input(run.recipe.decontamination_report, kind="other")  # checked against its manifest
            synth = run.rec.hasher.digest(run.paths.inputs["synth"].data)  # the data decontamination must have read
            inputs = resolve_inputs(
                run.recipe,
                run.paths,
                root=ROOT,
                stdlib_root=stdlib,
                stdlib_uri=uri,
                synth_digest={synth.algorithm: synth.digest},
            )
            determinism = set_deterministic(run.recipe.seed, cpu_threads=run.recipe.threads)  # seeds, threads, kernels
            result = run_eval(run.recipe, inputs, run.out_dir, determinism=determinism, progress=print)
            for row in result.table["rows"]:  # each checkpoint's scores to the run's tracker (Aim)
                scores = numeric_leaves({k: row[k] for k in ("bits_per_byte", "nats_per_token", "pass_at_1")})
                run.tracker.log_metrics(row["checkpoint"]["step"], scores, {"subset": "heldout", "model": row["stage"]})
            run.report = result.report
    finally:
        destroy()
    print((ROOT / run.paths.out / MARKDOWN_NAME).read_text("utf-8"), end="")


if __name__ == "__main__":
    main()
