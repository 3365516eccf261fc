"""The data half of the flow, one module per stage, plus the formats they share.

:mod:`.ingest` (snapshot real offline text), :mod:`.dedup` (exact + MinHash LSH), :mod:`.synth`
(seeded verifiable math), :mod:`.decontaminate` (n-gram overlap with evaluation sets + cluster
expansion), :mod:`.mix` (topic x quality buckets, quality-aware upsampling), :mod:`.tokenize` (BPE +
packed safetensors sequences), :mod:`.order` (the exact batch at any step); :mod:`.shards` is the
zstd JSONL dataset format every stage reads and writes.
"""
