"""Data stages' library code: corpus ingest (:mod:`.ingest`) and zstd JSONL shards (:mod:`.shards`)."""
