"""Stage 1, ingest: snapshot offline real text (stdlib code + pydoc prose) into zstd JSONL shards.

python stages/ingest.py                          # the reference recipe, params/ingest.yaml
python stages/ingest.py --config-name ingest_full  # the whole standard library
python stages/ingest.py ingest.shards.zstd_level=3 # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.ingest import IngestConfig, run_ingest
from flowpin.manifest import record
from flowpin.manifest.resolve import python_stdlib_uri
from flowpin.recipe import StagePaths, hydra_sources, to_config, to_plain

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="ingest", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recipe = to_config(IngestConfig, cfg.ingest, where="ingest")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    src = hydra_sources(ROOT / "params")
    with record(
        "ingest",
        recipe=to_plain(cfg),
        overrides=src.overrides,
        config_files=src.config_files,
        root=ROOT,
        manifest=paths.manifest,
    ) as rec:
        with atomic_directory(ROOT / paths.out) as tmp:
            result = run_ingest(recipe, tmp)
        rec.fileset(
            "python-stdlib",
            base=result.stdlib_root,
            files=result.inputs_read,
            kind="dataset",
            uri=python_stdlib_uri(),
        )
        atomic_write_bytes(ROOT / paths.report, canonical_json(result.report) + b"\n")
        rec.output(paths.out)
        rec.byproduct(paths.report)
    print(f"ingest: {result.documents} documents, {result.total_bytes} bytes, {len(result.shards)} shards")


if __name__ == "__main__":
    main()
