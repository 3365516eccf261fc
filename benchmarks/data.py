"""Data-stage benchmark on the full variant (the whole standard library), measured side by side.

    python benchmarks/data.py            # runs `make data-full`'s stages first if their outputs are missing

Prints, each beside its baseline from the same run:
* MinHash LSH dedup throughput (documents/s) vs the exact-only pass on the same documents;
* tokenize throughput (tokens/s, encode + EOS-pack into sequences) vs the bare `tokenizers`
  `encode_batch` of the same texts;
* the hashing cost share of every full-variant stage: the seconds its manifest's run context reports
  for digesting inputs/outputs/code (and for the environment fingerprint) over the stage's duration.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from figures import Figure, write_figures
from flowpin.constants import MANIFEST_DIR
from flowpin.data.dedup import DedupConfig, dedup_records
from flowpin.data.packing import pack_texts
from flowpin.data.shards import read_dataset
from flowpin.data.tokenize import TokenizeConfig
from flowpin.data.tokenized import TokenizedDataset
from flowpin.manifest.statement import load_manifest
from flowpin.recipe import to_config

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "dedup", "decontaminate", "mix", "tokenize")


def best(fn: Callable[[], Any], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ensure_full_variant() -> None:
    if all((ROOT / MANIFEST_DIR / "full" / f"{s}.json").exists() for s in STAGES):
        return
    print("building the full variant (make data-full) ...", flush=True)
    subprocess.run(["make", "data-full"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", help="also write the headline figures here as JSON (benchmarks/run_all.py)")
    args = parser.parse_args()
    ensure_full_variant()
    full = ROOT / "data" / "full"

    docs = list(read_dataset(full / "ingest"))
    cfg = to_config(DedupConfig, OmegaConf.load(ROOT / "params" / "dedup_full.yaml").dedup, where="dedup")
    exact_only = dataclasses.replace(cfg, fuzzy=dataclasses.replace(cfg.fuzzy, enabled=False))
    t_exact = best(lambda: dedup_records(docs, exact_only))
    t_fuzzy = best(lambda: dedup_records(docs, cfg))
    mb = sum(len(d["text"].encode()) for d in docs) / 2**20
    print(f"\ndedup on data/full/ingest: {len(docs)} documents, {mb:.1f} MiB")
    print(f"  {'exact only (baseline)':<40} {len(docs) / t_exact:10.0f} docs/s  x1.00")
    print(f"  {'exact + MinHash LSH (recipe)':<40} {len(docs) / t_fuzzy:10.0f} docs/s  x{t_exact / t_fuzzy:.2f}")
    figures = [
        Figure(
            "data",
            f"dedup exact + MinHash LSH, {len(docs)} docs",
            len(docs) / t_fuzzy,
            "docs/s",
            "exact-only dedup",
            t_fuzzy / t_exact,
        ),
    ]

    data = TokenizedDataset.open(full / "tokenize")
    tok = data.tokenizer()
    tcfg = to_config(TokenizeConfig, OmegaConf.load(ROOT / "params" / "tokenize_full.yaml").tokenize, where="tokenize")
    texts = [d["text"] for d in read_dataset(full / "mix")]
    index = data.index
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts)) + len(texts)  # all tokens encoded, + one EOS each
    t_raw = best(lambda: tok.encode_batch(texts), 2)
    t_pack = best(
        lambda: pack_texts(
            tok,
            texts,
            seq_len=tcfg.packing.seq_len,
            tail=tcfg.packing.tail,
            eos_id=index["eos_id"],
            pad_id=index["pad_id"],
        ),
        2,
    )
    print(f"\ntokenize on data/full/mix: {len(texts)} documents, {n_tokens} tokens")
    print(f"  {'tokenizers encode_batch (baseline)':<40} {n_tokens / t_raw:10.0f} tok/s   x1.00")
    print(f"  {'flowpin encode + EOS + pack':<40} {n_tokens / t_pack:10.0f} tok/s   x{t_raw / t_pack:.2f}")
    figures.append(
        Figure(
            "data",
            f"tokenize: encode + EOS + pack, {n_tokens} tokens",
            n_tokens / t_pack,
            "tok/s",
            "tokenizers encode_batch",
            t_pack / t_raw,
        )
    )

    print("\nhashing cost share per full-variant stage (from each manifest's run context)")
    print(f"  {'stage':<15} {'duration':>9} {'hashing':>9} {'share':>7} {'files':>7} {'MiB':>8} {'fingerprint':>12}")
    for stage in STAGES:
        m = load_manifest(ROOT / MANIFEST_DIR / "full" / f"{stage}.json")
        ctx = next(b["annotations"] for b in m.run_details["byproducts"] if b["name"] == "run-context")
        share = ctx["hashingSeconds"] / ctx["durationSeconds"]
        print(
            f"  {stage:<15} {ctx['durationSeconds']:8.2f}s {ctx['hashingSeconds']:8.2f}s {share:6.1%} "
            f"{ctx['hashedFiles']:7d} {ctx['hashedBytes'] / 2**20:8.1f} {ctx['fingerprintSeconds']:11.2f}s"
        )
        figures.append(
            Figure(
                "data",
                f"{stage} stage: digesting its inputs/outputs/code",
                ctx["hashedBytes"] / 2**20 / max(ctx["hashingSeconds"], 1e-9),
                "MiB/s",
                f"the whole {stage} stage run ({ctx['durationSeconds']:.1f} s)",
                share,
            )
        )
    write_figures(args.figures, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
