"""The data half of the flow: one module per stage, one per format or computation the stages share.

Stages (each ``run_<stage>`` is what ``stages/<script>.py`` calls), in flow order:

* :mod:`.ingest` -- snapshot real offline text (the Python standard library) into a corpus;
* :mod:`.dedup` -- exact and MinHash LSH near-duplicate removal;
* :mod:`.synth` -- seeded, verifiable math tasks (train and held-out splits);
* :mod:`.decontaminate` -- n-gram overlap with the evaluation sets, plus cluster expansion;
* :mod:`.mix` -- topic x quality buckets and quality-aware upsampling (its recipe: :mod:`.mix_config`);
* :mod:`.tokenize` -- the tokenize stage: composes the three modules below.

What the tokenize stage is made of, each usable on its own:

* :mod:`.tokenizer` -- the byte-level BPE tokenizer: its recipe, training, loading ``tokenizer.json``;
* :mod:`.packing` -- documents' token ids -> fixed-length sequences (pure);
* :mod:`.tokenized` -- the tokenized dataset on disk: its writer, its reader
  (:class:`~.tokenized.TokenizedDataset`) and its directory digest.

Formats and orders every stage relies on:

* :mod:`.shards` -- the zstd JSONL dataset format every corpus stage reads and writes (and the reproducible
  zstd frame);
* :mod:`.order` -- the exact batch at any training step over a tokenized dataset, and what it holds.

Imports only point one way: ``tokenize`` imports ``order``, which imports ``tokenized``, which imports
``tokenizer``; ``packing`` and ``shards`` import no other data module. No cycle (``tests/data/test_tokenized.py``).
"""
