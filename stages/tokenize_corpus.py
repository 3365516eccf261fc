"""Stage 5, tokenize: train a byte-level BPE (or reuse one), pack a corpus into safetensors sequence shards.

python stages/tokenize_corpus.py                                    # the reference recipe, params/tokenize.yaml
python stages/tokenize_corpus.py --config-name tokenize_full        # the full flow
python stages/tokenize_corpus.py --config-name tokenize_midtrain    # reuses data/tokenize's tokenizer
python stages/tokenize_corpus.py tokenize.packing.seq_len=128       # any Hydra override; recorded in the manifest

A recipe with ``tokenize.tokenizer.source: input`` reuses the tokenizer of ``paths.inputs.tokenizer``
(pinned like any input, its manifest a parent); the file itself is also declared with kind ``tokenizer``.
HF tokenizers runs without its thread pool for the whole library call (``TOKENIZERS_PARALLELISM=false``,
set and restored here, so the recorded environment is the one the stage was started with).

(Not ``stages/tokenize.py``: run as a script, a file of that name in stages/ would shadow the standard
library's ``tokenize`` module for *every* stage script, since their directory is ``sys.path[0]``.)
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.data.tokenize import TokenizeConfig, check_tokenizer_source, run_tokenize
from flowpin.data.tokenized import TOKENIZER_NAME
from flowpin.data.tokenizer import TOKENIZER_ROLE, tokenizers_single_threaded
from flowpin.recipe import StagePaths
from flowpin.recipe_schema import register_schema
from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]
register_schema("tokenize")  # the structured config params/*.yaml compose onto (schema/tokenize)


def _preflight(recipe: TokenizeConfig, paths: StagePaths) -> None:
    check_tokenizer_source(recipe, has_input=TOKENIZER_ROLE in paths.inputs)


@hydra.main(config_path="../params", config_name="tokenize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("tokenize", cfg, TokenizeConfig, root=ROOT, inputs=("corpus",), preflight=_preflight) as run:
        reuse = run.input_dir(TOKENIZER_ROLE) if TOKENIZER_ROLE in run.paths.inputs else None
        if reuse is not None:
            run.rec.input(reuse / TOKENIZER_NAME, kind="tokenizer")
        with tokenizers_single_threaded():  # set here, not in the library; restored before the manifest's fingerprint
            result = run_tokenize(run.recipe, run.input_dir("corpus"), run.out_dir, tokenizer_dir=reuse)
        run.report = result.report
        run.rec.note("timing", **result.timing)  # run metadata: not in the report, which dvc.lock pins
    print(
        f"tokenize: {result.documents} documents, {result.tokens} tokens, "
        f"{result.sequences} sequences of {run.recipe.packing.seq_len} in {result.shards} shards"
    )


if __name__ == "__main__":
    main()
