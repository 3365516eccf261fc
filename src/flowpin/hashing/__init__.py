"""Content digests of files, directories and file sets: streaming, parallel when asked, stat-cached.

The package's interface is re-exported here; each concept has its module:

* :mod:`~flowpin.hashing.digest` -- the digest rules (what manifests pin): a file by its content (a ``.zst``
  file decompressed), a directory or file set by the sorted ``"<hexdigest>  <relpath>\\n"`` lines, and each
  file's raw digest beside (in-toto's ``dirHash`` for directories); :class:`ArtifactDigest` results.
* :mod:`~flowpin.hashing.hasher` -- :class:`Hasher`: walks repository artifacts (refusing unsafe names and
  symlinks), hashes each real file once and assembles the digests.
* :mod:`~flowpin.hashing.cache` -- :class:`StatCache`: a file's digests remembered under its stat key.
* :mod:`~flowpin.hashing.pool` -- hashing workers: in this process, or forked processes when the caller
  passes ``workers`` > 1 (its entry point decides; :func:`parallel_workers` is every core).
* :mod:`~flowpin.hashing.meter` -- the ``progress(done, total)`` hook of a Hasher call, and
  :func:`reporting_progress` for the Hashers library code builds.

Manifests name each digest by its key in :mod:`flowpin.manifest.digests`; the README documents the rules.
"""

from flowpin.hashing.cache import StatCache, default_cache
from flowpin.hashing.digest import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    ArtifactDigest,
    FileDigest,
    check_algorithm,
    hash_bytes,
    hash_file,
    hash_file_digests,
    new_hash,
    tree_digest,
)
from flowpin.hashing.hasher import Hasher, HashStats
from flowpin.hashing.meter import ProgressHook, reporting_progress
from flowpin.hashing.pool import parallel_workers

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "ArtifactDigest",
    "FileDigest",
    "HashStats",
    "Hasher",
    "ProgressHook",
    "StatCache",
    "check_algorithm",
    "default_cache",
    "hash_bytes",
    "hash_file",
    "hash_file_digests",
    "new_hash",
    "parallel_workers",
    "reporting_progress",
    "tree_digest",
]
