"""Stage 1, ingest: snapshot offline real text (stdlib code + pydoc prose) into zstd JSONL shards.

python stages/ingest.py                          # the reference recipe, params/ingest.yaml
python stages/ingest.py --config-name ingest_full  # the whole standard library
python stages/ingest.py ingest.shards.zstd_level=3 # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.data.ingest import IngestConfig, run_ingest
from flowpin.manifest.resolve import python_stdlib_uri
from flowpin.recipe_schema import register_schema
from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]
register_schema("ingest")  # the structured config params/*.yaml compose onto (schema/ingest)


@hydra.main(config_path="../params", config_name="ingest", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("ingest", cfg, IngestConfig, root=ROOT) as run:
        result = run_ingest(run.recipe, run.out_dir)
        run.rec.fileset(
            "python-stdlib", base=result.stdlib_root, files=result.inputs_read, kind="dataset", uri=python_stdlib_uri()
        )
        run.report = result.report
    print(f"ingest: {result.documents} documents, {result.total_bytes} bytes, {len(result.shards)} shards")


if __name__ == "__main__":
    main()
