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

from flowpin.data.tokenize import TokenizeConfig, run_tokenize
from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="tokenize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("tokenize", cfg, TokenizeConfig, root=ROOT, inputs=("corpus",)) as run:
        result = run_tokenize(run.recipe, run.input_dir("corpus"), run.out_dir)
        run.report = result.report
    print(
        f"tokenize: {result.documents} documents, {result.tokens} tokens, "
        f"{result.sequences} sequences of {run.recipe.packing.seq_len} in {result.shards} shards"
    )


if __name__ == "__main__":
    main()
