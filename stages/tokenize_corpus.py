"""Stage 5, tokenize: train a byte-level BPE, pack the mixed corpus into safetensors sequence shards.

python stages/tokenize_corpus.py                              # the reference recipe, params/tokenize.yaml
python stages/tokenize_corpus.py --config-name tokenize_full  # the full flow
python stages/tokenize_corpus.py tokenize.packing.seq_len=128  # any Hydra override; recorded in the manifest

(Not ``stages/tokenize.py``: run as a script, a file of that name in stages/ would shadow the standard
library's ``tokenize`` module for *every* stage script, since their directory is ``sys.path[0]``.)
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.tokenize import TokenizeConfig, run_tokenize
from flowpin.errors import RecipeError
from flowpin.manifest.record import record
from flowpin.recipe import StagePaths, hydra_sources, to_config, to_plain

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="tokenize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recipe = to_config(TokenizeConfig, cfg.tokenize, where="tokenize")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    corpus = paths.inputs.get("corpus")
    if corpus is None:
        raise RecipeError("paths.inputs.corpus: missing; name the mixed corpus (data: data/mix, manifest: ...)")
    src = hydra_sources(ROOT / "params")
    with record(
        "tokenize",
        recipe=to_plain(cfg),
        overrides=src.overrides,
        config_files=src.config_files,
        root=ROOT,
        manifest=paths.manifest,
    ) as rec:
        rec.upstream(data=corpus.data, manifest=corpus.manifest)
        with atomic_directory(ROOT / paths.out) as tmp:
            result = run_tokenize(recipe, ROOT / corpus.data, tmp)
        atomic_write_bytes(ROOT / paths.report, canonical_json(result.report) + b"\n")
        rec.output(paths.out)
        rec.byproduct(paths.report)
    print(
        f"tokenize: {result.documents} documents, {result.tokens} tokens, "
        f"{result.sequences} sequences of {recipe.packing.seq_len} in {result.shards} shards"
    )


if __name__ == "__main__":
    main()
