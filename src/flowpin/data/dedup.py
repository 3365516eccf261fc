"""Stage 2, dedup: drop exact duplicates, then fuzzy near-duplicates (MinHash LSH), keeping first occurrences.

This module owns *which* documents of a dataset survive deduplication and the report of *why* the others
did not. Both passes walk the records in input order and keep the first document of each group, so the
outcome is a function of the input bytes and the recipe alone:

1. **Exact**: the SHA-256 of each document's *normalised* text (``dedup.normalize``: lowercase, collapse
   whitespace runs to one space, strip). A document whose digest was already seen is dropped as a
   duplicate of the first document with that digest.
2. **Fuzzy**: each remaining document becomes a set of shingles (word or character n-grams of its
   normalised text), each shingle a 64-bit hash. A :class:`datasketch.MinHash` of that set queries a
   :class:`datasketch.MinHashLSH` index that holds only *kept* documents; every candidate it returns is
   checked with the **exact** Jaccard similarity of the two shingle sets (LSH only proposes, it never
   decides). A document whose best candidate reaches ``dedup.fuzzy.threshold`` is dropped into that
   candidate's cluster; otherwise it is kept and indexed. Only kept documents are indexed, so clusters
   never chain (A~B, B~C does not drop C unless C~A). Documents with fewer than ``min_tokens`` tokens
   (or fewer than ``shingle_size``) take no part in the fuzzy pass and are always kept.

Survivors are written unchanged and in input order (:mod:`flowpin.data.shards`). :func:`dedup_records`
is the pure core (records in, :class:`DedupResult` out, no I/O) that benchmarks time;
:func:`run_dedup` reads an input dataset and writes the output dataset into a directory its caller owns
(the stage wraps it in :func:`flowpin.atomic.atomic_directory`).

Shingle hashing is content-derived and process-independent (never Python's salted ``hash()``): a word
token is hashed with BLAKE2b-64, a character by its code point through the splitmix64 finaliser, and an
n-gram by a polynomial over its tokens' hashes (mod 2**64) followed by the same finaliser. The MinHash
uses datasketch's ``affine64`` permutation scheme, named explicitly so that a change of datasketch's
default cannot silently change which documents survive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from datasketch import MinHash, MinHashLSH

from flowpin.data.shards import ShardConfig, ShardInfo, read_dataset, read_index, write_dataset
from flowpin.errors import DataError, EmptyCorpusError, RecipeError
from flowpin.recipe import check_int

SHINGLE_KINDS = ("word", "char")
"""Shingle kinds: n-grams of ``\\w+`` word tokens, or of characters."""
MIN_NUM_PERM = 16
"""Fewest MinHash permutations a recipe may ask for (fewer make the Jaccard estimate useless)."""
MAX_NUM_PERM = 1024
"""Most MinHash permutations a recipe may ask for (datasketch's band/row search grows ~quadratically)."""
MAX_SEED = 2**32 - 1
"""Largest MinHash seed (datasketch seeds ``numpy.random.RandomState``, which takes 32 bits)."""
MINHASH_SCHEME = "affine64"
"""datasketch permutation scheme used for every MinHash (pinned, not datasketch's default)."""

_WORD = re.compile(r"\w+")
_WHITESPACE = re.compile(r"\s+")
_CHUNK = 8192  # shingles per MinHash.update_batch call: bounds its (chunk x num_perm) temporary
_U64 = np.uint64
_POLY = _U64(0x9E3779B97F4A7C15)  # odd multiplier of the n-gram polynomial
_SM1 = _U64(0xBF58476D1CE4E5B9)
_SM2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31 = _U64(30), _U64(27), _U64(31)

U64Array = npt.NDArray[np.uint64]
"""A one-dimensional array of 64-bit shingle hashes."""


# --- configs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormalizeConfig:
    """How text is normalised before hashing (``dedup.normalize``); used by both passes."""

    lowercase: bool
    """Lower-case the text (``str.lower``)."""
    collapse_whitespace: bool
    """Replace every run of Unicode whitespace with one space."""
    strip: bool
    """Remove leading and trailing whitespace."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        for key in ("lowercase", "collapse_whitespace", "strip"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"{where}.{key}: {getattr(self, key)!r} must be true or false")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FuzzyConfig:
    """The MinHash LSH pass (``dedup.fuzzy``); validated by :class:`DedupConfig`."""

    enabled: bool
    """Run the fuzzy pass at all (``false``: exact dedup only)."""
    shingle: str
    """``word``: n-grams of ``\\w+`` tokens of the normalised text; ``char``: n-grams of its characters."""
    shingle_size: int
    """n of the n-grams (>= 1)."""
    num_perm: int
    """MinHash permutations (16..1024); more gives a sharper LSH cut at a proportional cost."""
    threshold: float
    """Exact Jaccard similarity of shingle sets, in (0, 1], at or above which a document is a near-duplicate
    of a kept one. Also the similarity the LSH bands are tuned for when ``bands``/``rows`` are null."""
    seed: int
    """MinHash seed (0..2**32-1): chooses the permutations, hence which pairs the LSH proposes."""
    min_tokens: int
    """Documents with fewer tokens (words or characters, per ``shingle``) skip the fuzzy pass and are kept:
    tiny files share most of their few shingles by accident."""
    bands: int | None = None
    """LSH bands; with ``rows``, pins the index layout (``bands * rows <= num_perm``, ``bands >= 2``).
    Null (with ``rows`` null): datasketch picks them for ``threshold``."""
    rows: int | None = None
    """MinHash values per LSH band; set together with ``bands``."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if not isinstance(self.enabled, bool):
            raise RecipeError(f"{where}.enabled: {self.enabled!r} must be true or false")
        if self.shingle not in SHINGLE_KINDS:
            raise RecipeError(f"{where}.shingle: {self.shingle!r} is not one of {', '.join(SHINGLE_KINDS)}")
        check_int(self.shingle_size, f"{where}.shingle_size", minimum=1)
        check_int(self.num_perm, f"{where}.num_perm", minimum=MIN_NUM_PERM, maximum=MAX_NUM_PERM)
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, float | int) or not 0 < threshold <= 1:
            raise RecipeError(
                f"{where}.threshold: {threshold!r} must be a Jaccard similarity in (0, 1], e.g. 0.8; "
                "higher drops fewer documents"
            )
        check_int(self.seed, f"{where}.seed", minimum=0, maximum=MAX_SEED)
        check_int(self.min_tokens, f"{where}.min_tokens", minimum=0)
        if (self.bands is None) != (self.rows is None):
            raise RecipeError(f"{where}.bands/rows: set both (to pin the LSH layout) or neither (to derive it)")
        if self.bands is not None and self.rows is not None:
            check_int(self.bands, f"{where}.bands", minimum=2)
            check_int(self.rows, f"{where}.rows", minimum=1)
            if self.bands * self.rows > self.num_perm:
                raise RecipeError(
                    f"{where}.bands: bands * rows = {self.bands} * {self.rows} exceeds {where}.num_perm = "
                    f"{self.num_perm}; lower them or raise num_perm"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What the report lists (``dedup.report``); validated by :class:`DedupConfig`."""

    max_examples: int
    """Most example groups/clusters listed per pass, and most members listed per example (counts are
    always complete)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.max_examples, f"{where}.max_examples", minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DedupConfig:
    """The dedup recipe (``dedup`` in ``params/dedup.yaml``). Validated on construction."""

    normalize: NormalizeConfig
    """Text normalisation applied before the exact digest and before shingling."""
    fuzzy: FuzzyConfig
    """The MinHash LSH near-duplicate pass (runs after exact dedup)."""
    shards: ShardConfig
    """Shard size and compression of the output dataset."""
    report: ReportConfig
    """How many examples the report lists."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "dedup") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``dedup.fuzzy.threshold`` ...)."""
        for key, cls in (
            ("normalize", NormalizeConfig),
            ("fuzzy", FuzzyConfig),
            ("shards", ShardConfig),
            ("report", ReportConfig),
        ):
            value = getattr(self, key)
            if not isinstance(value, cls):
                raise RecipeError(f"{where}.{key}: expected a {cls.__name__}, got {type(value).__name__}")
            value.validate(f"{where}.{key}")


# --- text → shingles → MinHash --------------------------------------------------------------------


def normalize(text: str, cfg: NormalizeConfig) -> str:
    """``text`` normalised as ``cfg`` says (lowercase, then collapse whitespace, then strip)."""
    if cfg.lowercase:
        text = text.lower()
    if cfg.collapse_whitespace:
        text = _WHITESPACE.sub(" ", text)
    if cfg.strip:
        text = text.strip()
    return text


def _mix64(x: U64Array) -> U64Array:
    """splitmix64's finaliser, element-wise: a fixed avalanching bijection of uint64 (wraps mod 2**64)."""
    x = x ^ (x >> _S30)
    x = x * _SM1
    x = x ^ (x >> _S27)
    x = x * _SM2
    return x ^ (x >> _S31)


def _word_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


class Shingler:
    """Turns normalised text into its set of shingle hashes (sorted unique uint64), as ``cfg`` says.

    Holds a cache of word-token hashes, so one instance should serve a whole corpus; its output depends
    only on the text and ``cfg``, never on what it saw before.
    """

    def __init__(self, cfg: FuzzyConfig) -> None:
        self.kind = cfg.shingle
        self.size = cfg.shingle_size
        self._vocab: dict[str, int] = {}

    def tokens(self, text: str) -> U64Array:
        """One 64-bit hash per token (word or character) of ``text``, in order."""
        if self.kind == "char":
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint64)
            return _mix64(codes)
        vocab = self._vocab
        values: list[int] = []
        for word in _WORD.findall(text):
            value = vocab.get(word)
            if value is None:
                value = vocab[word] = _word_hash(word)
            values.append(value)
        return np.array(values, dtype=np.uint64)

    def shingles(self, tokens: U64Array) -> U64Array:
        """Sorted unique hashes of the ``size``-grams of ``tokens`` (empty if there are fewer tokens)."""
        count = len(tokens) - self.size + 1
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        h = tokens[:count].copy()
        for j in range(1, self.size):
            h = h * _POLY + tokens[j : j + count]
        return np.unique(_mix64(h))


def _identity(value: int) -> int:
    return value


def minhash_template(cfg: FuzzyConfig) -> MinHash:
    """An empty MinHash for ``cfg`` whose inputs are shingle hashes (copy it per document)."""
    return MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=_identity, scheme=MINHASH_SCHEME)


def minhash(shingles: U64Array, template: MinHash) -> MinHash:
    """The MinHash of one document's shingle set (a copy of ``template`` updated in bounded chunks)."""
    m = template.copy()
    for start in range(0, len(shingles), _CHUNK):
        m.update_batch(shingles[start : start + _CHUNK].tolist())
    return m


def make_lsh(cfg: FuzzyConfig, where: str = "dedup.fuzzy") -> MinHashLSH:
    """An empty LSH index for ``cfg``; a layout datasketch refuses raises :class:`RecipeError`."""
    params = (cfg.bands, cfg.rows) if cfg.bands is not None and cfg.rows is not None else None
    try:
        return MinHashLSH(threshold=float(cfg.threshold), num_perm=cfg.num_perm, params=params)
    except ValueError as exc:
        raise RecipeError(
            f"{where}.threshold: datasketch cannot build an LSH index for threshold {cfg.threshold} with "
            f"num_perm {cfg.num_perm} ({exc}); lower the threshold, raise num_perm, or pin the layout with "
            f"{where}.bands and {where}.rows (bands >= 2)"
        ) from exc


def jaccard(a: U64Array, b: U64Array) -> float:
    """Exact Jaccard similarity of two sorted-unique hash sets (0.0 when both are empty)."""
    inter = int(np.intersect1d(a, b, assume_unique=True).size)
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


# --- results --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExactGroup:
    """Documents whose normalised text is identical: the kept first one and the dropped rest."""

    kept: str
    """Id of the kept (first) document."""
    duplicates: tuple[str, ...]
    """Ids of the dropped documents, in input order."""
    sha256: str
    """Hex SHA-256 of the shared normalised text."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FuzzyMember:
    """A document dropped as a near-duplicate of a cluster's kept document."""

    id: str
    """Its id."""
    jaccard: float
    """Exact Jaccard similarity of its shingle set to the kept document's."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FuzzyCluster:
    """A kept document and the near-duplicates dropped in its favour."""

    kept: str
    """Id of the kept representative (the first of the cluster in input order)."""
    members: tuple[FuzzyMember, ...]
    """Dropped members, in input order."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DedupResult:
    """What :func:`dedup_records` decided (and, from :func:`run_dedup`, the shards it wrote)."""

    records: tuple[dict[str, Any], ...]
    """The surviving records, unchanged and in input order."""
    documents_in: int
    """Records read."""
    exact_groups: tuple[ExactGroup, ...]
    """Every exact-duplicate group, in order of its kept document."""
    fuzzy_clusters: tuple[FuzzyCluster, ...]
    """Every near-duplicate cluster, in order of its kept document."""
    report: dict[str, Any]
    """Canonical-JSON-safe report: params, per-source and total counts, examples (also in ``index.json``)."""
    shards: tuple[ShardInfo, ...] = ()
    """Shards written (only from :func:`run_dedup`)."""

    @property
    def documents_out(self) -> int:
        """Records that survived."""
        return len(self.records)

    @property
    def exact_duplicates(self) -> int:
        """Records dropped as exact duplicates."""
        return sum(len(g.duplicates) for g in self.exact_groups)

    @property
    def fuzzy_duplicates(self) -> int:
        """Records dropped as near-duplicates."""
        return sum(len(c.members) for c in self.fuzzy_clusters)


# --- running --------------------------------------------------------------------------------------


def _source_of(record_id: str) -> str:
    """The source a record counts under: its id's prefix before the first ``/`` (ingest's source name)."""
    return record_id.split("/", 1)[0] if "/" in record_id else "(no source prefix)"


def _checked(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records as a list, each with a unique str ``id`` and a str ``text``; else :class:`DataError`."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, record in enumerate(records):
        rid, text = record.get("id"), record.get("text")
        if not isinstance(rid, str) or not rid:
            raise DataError(f"record {i} has no non-empty string 'id'; dedup reads ingest's record format")
        if not isinstance(text, str):
            raise DataError(f"record {i} ({rid!r}) has no string 'text'; dedup reads ingest's record format")
        if rid in seen:
            raise DataError(f"record {i}: id {rid!r} occurs twice; ids must be unique (fix the upstream stage)")
        seen.add(rid)
        out.append(dict(record))
    return out


def dedup_records(records: Sequence[Mapping[str, Any]], cfg: DedupConfig) -> DedupResult:
    """Exact then fuzzy dedup of ``records`` (in order) under ``cfg``; pure: no I/O, no global state.

    Raises :class:`EmptyCorpusError` for no records, :class:`DataError` for a record without a string
    ``id``/``text`` or a repeated id, :class:`RecipeError` for an invalid recipe. Since the first document
    of every group is kept, a non-empty input always has survivors (no ``NoSurvivorsError`` is possible).
    """
    cfg.validate()
    fz = cfg.fuzzy
    lsh = make_lsh(fz) if fz.enabled else None  # fail on a bad layout before any work
    docs = _checked(records)
    if not docs:
        raise EmptyCorpusError(
            "dedup: the input dataset holds no document; check paths.inputs.corpus and rerun the upstream stage"
        )

    # 1. exact
    first_by_digest: dict[str, int] = {}
    exact_dups: dict[int, list[int]] = {}
    digests: list[str] = []
    norm: list[str] = []
    for i, doc in enumerate(docs):
        text = normalize(doc["text"], cfg.normalize)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        digests.append(digest)
        norm.append(text)
        kept = first_by_digest.setdefault(digest, i)
        if kept != i:
            exact_dups.setdefault(kept, []).append(i)
    dropped_exact = {j for dups in exact_dups.values() for j in dups}

    # 2. fuzzy, over the exact survivors in input order
    clusters: dict[int, list[tuple[int, float]]] = {}
    # short: no shingles or < min_tokens; near_misses: kept although the LSH proposed candidates
    short = candidates_checked = near_misses = 0
    if lsh is not None:
        shingler = Shingler(fz)
        template = minhash_template(fz)
        sets: dict[int, U64Array] = {}
        for i in range(len(docs)):
            if i in dropped_exact:
                continue
            tokens = shingler.tokens(norm[i])
            shingles = shingler.shingles(tokens) if len(tokens) >= fz.min_tokens else None
            if shingles is None or not len(shingles):
                short += 1
                continue
            m = minhash(shingles, template)
            best, best_j = -1, -1.0
            for c in sorted(lsh.query(m)):
                j = jaccard(shingles, sets[c])
                candidates_checked += 1
                if j > best_j:  # ties keep the earliest kept document (candidates are sorted)
                    best, best_j = c, j
            if best >= 0 and best_j >= fz.threshold:
                clusters.setdefault(best, []).append((i, best_j))
            else:
                if best >= 0:
                    near_misses += 1
                sets[i] = shingles
                lsh.insert(i, m, check_duplication=False)
    dropped_fuzzy = {j for members in clusters.values() for j, _ in members}

    survivors = tuple(doc for i, doc in enumerate(docs) if i not in dropped_exact and i not in dropped_fuzzy)
    exact_groups = tuple(
        ExactGroup(kept=docs[k]["id"], duplicates=tuple(docs[j]["id"] for j in dups), sha256=digests[k])
        for k, dups in sorted(exact_dups.items())
    )
    fuzzy_clusters = tuple(
        FuzzyCluster(kept=docs[k]["id"], members=tuple(FuzzyMember(id=docs[j]["id"], jaccard=s) for j, s in ms))
        for k, ms in sorted(clusters.items())
    )
    report = _report(
        cfg,
        docs,
        dropped_exact,
        dropped_fuzzy,
        exact_groups,
        fuzzy_clusters,
        lsh=lsh,
        fuzzy_stats={
            "skipped_short": short,
            "candidates_checked": candidates_checked,
            "kept_below_threshold": near_misses,
        },
    )
    return DedupResult(
        records=survivors,
        documents_in=len(docs),
        exact_groups=exact_groups,
        fuzzy_clusters=fuzzy_clusters,
        report=report,
    )


def _round(x: float) -> float:
    return round(x, 6)


def _report(
    cfg: DedupConfig,
    docs: list[dict[str, Any]],
    dropped_exact: set[int],
    dropped_fuzzy: set[int],
    exact_groups: tuple[ExactGroup, ...],
    fuzzy_clusters: tuple[FuzzyCluster, ...],
    *,
    lsh: MinHashLSH | None,
    fuzzy_stats: dict[str, int],
) -> dict[str, Any]:
    n = cfg.report.max_examples
    sources: dict[str, Counter[str]] = {}
    for i, doc in enumerate(docs):
        stats = sources.setdefault(_source_of(doc["id"]), Counter())
        size = len(doc["text"].encode("utf-8", "surrogatepass"))
        stats["documents_in"] += 1
        stats["bytes_in"] += size
        if i in dropped_exact:
            stats["exact_duplicates"] += 1
        elif i in dropped_fuzzy:
            stats["fuzzy_duplicates"] += 1
        else:
            stats["documents_out"] += 1
            stats["bytes_out"] += size
    keys = ("documents_in", "documents_out", "exact_duplicates", "fuzzy_duplicates", "bytes_in", "bytes_out")
    per_source = {name: {k: stats[k] for k in keys} for name, stats in sorted(sources.items())}
    totals = {k: sum(s[k] for s in per_source.values()) for k in keys}

    by_size = sorted(exact_groups, key=lambda g: -len(g.duplicates))  # stable: ties stay in input order
    exact = {
        "duplicates": totals["exact_duplicates"],
        "groups": len(exact_groups),
        "examples": [
            {"kept": g.kept, "duplicates": list(g.duplicates[:n]), "count": len(g.duplicates), "sha256": g.sha256}
            for g in by_size[:n]
        ],
    }
    fuzzy: dict[str, Any] = {"enabled": lsh is not None}
    if lsh is not None:
        sizes = Counter(1 + len(c.members) for c in fuzzy_clusters)
        by_cluster = sorted(fuzzy_clusters, key=lambda c: -len(c.members))
        fuzzy.update(
            {
                "duplicates": totals["fuzzy_duplicates"],
                "clusters": len(fuzzy_clusters),
                "cluster_sizes": {str(k): sizes[k] for k in sorted(sizes)},
                "lsh": {"bands": int(lsh.b), "rows": int(lsh.r)},
                "minhash": {"library": f"datasketch {_dist_version('datasketch')}", "scheme": MINHASH_SCHEME},
                **fuzzy_stats,
                "examples": [
                    {
                        "kept": c.kept,
                        "size": 1 + len(c.members),
                        "members": [{"id": m.id, "jaccard": _round(m.jaccard)} for m in c.members[:n]],
                    }
                    for c in by_cluster[:n]
                ],
            }
        )
    return {
        "params": dataclasses.asdict(cfg),
        "totals": totals,
        "sources": per_source,
        "exact": exact,
        "fuzzy": fuzzy,
    }


def run_dedup(cfg: DedupConfig, input_dir: Path, out_dir: Path) -> DedupResult:
    """Read the dataset at ``input_dir``, dedup it, write survivors + ``index.json`` to ``out_dir``.

    ``out_dir`` must hold no shards yet. The index carries the report's ``totals`` and ``sources`` as meta.
    """
    cfg.validate()
    read_index(input_dir)  # a missing/invalid index fails with its own message before anything else
    result = dedup_records(list(read_dataset(input_dir)), cfg)
    meta = {"dedup": {"totals": result.report["totals"], "sources": result.report["sources"]}}
    shards = write_dataset(
        result.records, out_dir, docs_per_shard=cfg.shards.docs_per_shard, level=cfg.shards.zstd_level, meta=meta
    )
    return dataclasses.replace(result, shards=tuple(shards))
