"""Stage 4, mix: topic x quality buckets and quality-aware upsampling to an (estimated) token budget.

This module owns *how much of each document* goes into the pretraining mix, after OLMo 3's Dolma 3 mix
(topic x quality buckets, quality-aware upsampling with the top tier repeated up to 7x, the bottom tier
dropped). Everything is decided by the recipe (``mix`` in ``params/mix.yaml``, :class:`MixConfig`) and is
deterministic:

1. **Topic.** An ordered list of declarative rules (:class:`~flowpin.data.mix_config.TopicRule`); each
   rule ANDs its conditions (globs on ``source.origin`` / ``source.generator`` / ``source.path`` /
   ``task.kind``, a regex on the text, a minimum UTF-8 length for long-document buckets); the first rule
   that matches names the topic, else ``default_topic``.
2. **Quality score** in [0, 1]: a weighted mean of per-feature scores
   (:class:`~flowpin.data.mix_config.FeaturesConfig` documents each feature). A feature's raw
   measurement is mapped to [0, 1] by a trapezoid ``band``; weights can be overridden per topic
   (``quality.topic_weights``). The score is rounded to 4 decimals, then the document gets the first
   tier (best first) whose ``min_score`` it reaches.
3. **Repetition factors.** Token counts are *estimates*, ``ceil(utf8_bytes / bytes_per_token)``, until
   the tokenizer exists (a later stage's recipe may give per-topic ratios measured with it,
   ``upsampling.topic_bytes_per_token``). Per group (the whole corpus, or each topic when
   ``target_shares`` is set, with budget ``token_budget x share``), with base tokens ``B_i`` and caps
   ``m_i`` per tier (``upsampling.tier_max_factors``; 0 drops a tier): every tier starts at
   ``min(1, m_i)``. Under budget, tiers with ``m_i > 1`` move together along ``f_i = 1 + s·(m_i - 1)``
   with the one ``s ∈ [0, 1]`` that meets the budget (``s = 1``, every tier at its cap, when the data
   cannot reach it: an undershoot the report shows). Over budget, the worst kept tier is thinned first,
   then the next (quality-aware downsampling). The planned factors are the same for every topic in a
   group.
4. **Copies.** A bucket (topic, tier) with factor ``f`` gives every document ``floor(f)`` copies; the
   fractional part goes, as one more copy, to the bucket's best documents (score descending, then id)
   while each addition brings the bucket's tokens closer to ``f x B``. Repeats are distinct records: copy
   ``k ≥ 2`` has id ``<id>#r<k>``; every record gets ``"mix": {topic, tier, score, repeat}``.
5. **Order.** Records are sorted by ``sha256("flowpin.mix.order\\0<seed>\\0<id>")``: the order depends on
   the seed and the set of records only, never on input order; a different seed reorders the same
   multiset (no choice above uses the seed).

Documents whose text is blank are always dropped (they carry no tokens). :func:`mix_records` is pure
(records in, records and report out); :func:`run_mix` reads and writes datasets
(:mod:`flowpin.data.shards`). The recipe's typed configs and their validation are
:mod:`flowpin.data.mix_config`'s.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowpin.data.mix_config import FEATURES, MixConfig, QualityConfig, TopicsConfig, UpsamplingConfig
from flowpin.data.shards import ShardInfo, read_dataset, write_dataset
from flowpin.errors import DataError, EmptyCorpusError, InternalError, NoSurvivorsError

SCORE_DECIMALS = 4
"""Scores are rounded to this many decimals before tiering (the recorded score is the one tiered)."""
ESTIMATE_NOTE = "estimated: ceil(utf8_bytes / bytes_per_token) per document copy; no tokenizer exists before this stage"
TOPIC_ESTIMATE_NOTE = "estimated: ceil(utf8_bytes / bytes_per_token of the document's topic) per document copy"
"""The report's note when the recipe gives ``topic_bytes_per_token`` (measured ratios, not a blind guess)."""

_DOC_START = re.compile(r"(?i:[rbuf]{0,2})(\"\"\"|''')")
_MAX_EXAMPLES = 10


# --- features and scores ---------------------------------------------------------------------------


def measure(text: str, *, long_line_chars: int, duplicate_min_chars: int) -> dict[str, float]:
    """The raw value of every feature of :data:`FEATURES` for ``text`` (see :class:`FeaturesConfig`)."""
    nonspace = len(text) - sum(map(str.isspace, text))
    letters = sum(map(str.isalpha, text))
    lines = [line.rstrip() for line in text.split("\n") if line.strip()]
    n = len(lines)
    seen: set[str] = set()
    eligible = repeats = 0
    for line in lines:
        stripped = line.strip()
        if len(stripped) >= duplicate_min_chars:
            eligible += 1
            if stripped in seen:
                repeats += 1
            seen.add(stripped)
    return {
        "length_bytes": float(len(text.encode("utf-8"))),
        "alpha_fraction": letters / nonspace if nonspace else 0.0,
        "mean_line_chars": sum(map(len, lines)) / n if n else 0.0,
        "long_line_fraction": sum(1 for line in lines if len(line) > long_line_chars) / n if n else 0.0,
        "duplicate_line_fraction": repeats / eligible if eligible else 0.0,
        "comment_fraction": _comment_lines(lines) / n if n else 0.0,
    }


def _comment_lines(lines: Sequence[str]) -> int:
    """Non-blank lines that are ``#`` comments or inside a triple-quoted string opened at a line start."""
    count = 0
    quote: str | None = None
    for line in lines:
        s = line.strip()
        if quote is not None:
            count += 1
            if s.count(quote) % 2 == 1:
                quote = None
            continue
        if s.startswith("#"):
            count += 1
            continue
        m = _DOC_START.match(s)
        if m:
            count += 1
            if s.count(m.group(1)) % 2 == 1:
                quote = m.group(1)
    return count


def band_score(value: float, band: Sequence[float]) -> float:
    """Map ``value`` to [0, 1] by the trapezoid ``band`` (see :attr:`FeatureConfig.band`)."""
    zero_below, full_from, full_to, zero_above = band
    if full_from <= value <= full_to:
        return 1.0
    if value < full_from:
        return 0.0 if value <= zero_below else (value - zero_below) / (full_from - zero_below)
    return 0.0 if value >= zero_above else (zero_above - value) / (zero_above - full_to)


def score(raw: Mapping[str, float], quality: QualityConfig, topic: str) -> float:
    """Quality score in [0, 1] (rounded to :data:`SCORE_DECIMALS`) of a document of ``topic``."""
    weights = quality.weights(topic)
    total = math.fsum(weights.values())
    value = math.fsum(weights[n] * band_score(raw[n], quality.features.get(n).band) for n in FEATURES) / total
    return round(value, SCORE_DECIMALS)


# --- classification --------------------------------------------------------------------------------


class _Classifier:
    def __init__(self, topics: TopicsConfig) -> None:
        self.default = topics.default_topic
        self.rules = [(r, re.compile(r.text_regex) if r.text_regex is not None else None) for r in topics.rules]

    def topic(self, record: Mapping[str, Any]) -> str:
        source = record.get("source")
        task = record.get("task")
        origin, generator, path = _field(source, "origin"), _field(source, "generator"), _field(source, "path")
        task_kind = _field(task, "kind")
        text: str = record["text"]
        size: int | None = None  # UTF-8 length, measured only when a rule asks for it
        for rule, rx in self.rules:
            ok = (
                _glob(origin, rule.origin)
                and _glob(generator, rule.generator)
                and _glob(path, rule.path)
                and _glob(task_kind, rule.task_kind)
            )
            if ok and rule.min_bytes is not None:
                size = len(text.encode("utf-8")) if size is None else size
                ok = size >= rule.min_bytes
            if ok and (rx is None or rx.search(text)):
                return rule.topic
        return self.default


def _glob(value: str | None, pattern: str | None) -> bool:
    """A rule condition: no pattern always holds; a pattern needs a value it matches."""
    return pattern is None or (value is not None and fnmatch.fnmatchcase(value, pattern))


def _field(obj: Any, key: str) -> str | None:
    """``obj[key]`` when ``obj`` is a mapping and the value a string, else None."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, str) else None


# --- planning --------------------------------------------------------------------------------------


def plan_factors(base: Sequence[int], caps: Sequence[float], budget: float) -> list[float]:
    """Repetition factor per tier (best first) for base tokens ``base`` under ``caps`` and ``budget``.

    See the module docstring (step 3). Pure arithmetic; the result is never above a cap.
    """
    factors = [min(1.0, cap) for cap in caps]
    total = math.fsum(b * f for b, f in zip(base, factors, strict=True))
    if total < budget:
        room = math.fsum(b * (c - 1.0) for b, c in zip(base, caps, strict=True) if c > 1.0)
        if room > 0:
            s = min(1.0, (budget - total) / room)
            factors = [1.0 + s * (c - 1.0) if c > 1.0 else f for c, f in zip(caps, factors, strict=True)]
    elif total > budget:
        for i in reversed(range(len(factors))):
            if base[i] == 0 or factors[i] == 0:
                continue
            cut = min(factors[i], (total - budget) / base[i])
            factors[i] -= cut
            total -= cut * base[i]
            if total <= budget:
                break
    return factors


@dataclasses.dataclass(kw_only=True)
class _Doc:
    record: Mapping[str, Any]
    id: str
    topic: str
    tier: int
    score: float
    tokens: int
    copies: int = 0
    reason: str = ""


def _copies(docs: list[_Doc], factor: float) -> None:
    """Set ``copies`` of one bucket's documents for ``factor`` (module docstring, step 4)."""
    whole = math.floor(factor)
    target = (factor - whole) * sum(d.tokens for d in docs)
    extra = 0
    for doc in sorted(docs, key=lambda d: (-d.score, d.id)):
        doc.copies = whole
        if extra + doc.tokens / 2 <= target:
            doc.copies += 1
            extra += doc.tokens


# --- the mix ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixResult:
    """What :func:`mix_records` returns."""

    records: tuple[dict[str, Any], ...]
    """The mixed records in output order (repeats included)."""
    report: dict[str, Any]
    """Canonical-JSON-safe report: estimate note, input, budget, per topic x tier table, dropped, scores."""


def mix_records(records: Iterable[Mapping[str, Any]], cfg: MixConfig) -> MixResult:
    """Classify, score, plan and repeat ``records`` under ``cfg``; no I/O (see the module docstring).

    Raises :class:`EmptyCorpusError` for no input record, :class:`DataError` for a malformed or duplicate
    record, :class:`NoSurvivorsError` (naming the recipe key to change) when nothing is left to write.
    """
    classifier = _Classifier(cfg.topics)
    quality, up = cfg.quality, cfg.upsampling
    tiers = [t.name for t in quality.tiers]
    caps = [up.tier_max_factors[t] for t in tiers]
    docs: list[_Doc] = []
    empty: list[str] = []
    ids: set[str] = set()
    for n, record in enumerate(records, start=1):
        doc_id = _check_record(record, n)
        if doc_id in ids:
            raise DataError(f"record {n}: id {doc_id!r} occurs twice in the input; ids must be unique (run dedup)")
        ids.add(doc_id)
        text: str = record["text"]
        if not text.strip():
            empty.append(doc_id)
            continue
        topic = classifier.topic(record)
        raw = measure(text, long_line_chars=quality.long_line_chars, duplicate_min_chars=quality.duplicate_min_chars)
        value = score(raw, quality, topic)
        tier = next(i for i, t in enumerate(quality.tiers) if value >= t.min_score)
        tokens = math.ceil(len(text.encode("utf-8")) / up.topic_bytes_per_token.get(topic, up.bytes_per_token))
        docs.append(_Doc(record=record, id=doc_id, topic=topic, tier=tier, score=value, tokens=tokens))
    if not ids:
        raise EmptyCorpusError("mix: the input holds no document; check the upstream stage's output")

    topics = cfg.topics.produced()
    buckets: dict[tuple[str, int], list[_Doc]] = {}
    for doc in docs:
        buckets.setdefault((doc.topic, doc.tier), []).append(doc)
    base = {key: sum(d.tokens for d in bucket) for key, bucket in buckets.items()}
    factors: dict[tuple[str, int], float] = {}
    budgets: dict[str, float] = {}
    if up.target_shares is None:
        groups = [(topics, float(up.token_budget))]
    else:
        groups = [([t], up.token_budget * up.target_shares[t]) for t in topics]
    for group, budget in groups:
        tier_base = [sum(base.get((t, i), 0) for t in group) for i in range(len(tiers))]
        planned = plan_factors(tier_base, caps, budget)
        for t in group:
            budgets[t] = budget
            for i, f in enumerate(planned):
                factors[(t, i)] = f
    for key, bucket in buckets.items():
        _copies(bucket, factors[key])
    for doc in docs:
        if doc.copies == 0:
            if up.target_shares is not None and up.target_shares[doc.topic] == 0:
                doc.reason = "share"
            elif caps[doc.tier] == 0:
                doc.reason = "tier"
            else:
                doc.reason = "budget"

    out: list[dict[str, Any]] = []
    for doc in docs:
        for k in range(1, doc.copies + 1):
            mixed = dict(doc.record)
            mixed["id"] = doc.id if k == 1 else f"{doc.id}#r{k}"
            mixed["mix"] = {"topic": doc.topic, "tier": tiers[doc.tier], "score": doc.score, "repeat": k}
            out.append(mixed)
    if not out:
        raise NoSurvivorsError(_no_survivors_message(docs, empty, tiers, caps, up))
    clash = next((i for i, c in Counter(r["id"] for r in out).items() if c > 1), None)
    if clash is not None:
        raise DataError(f"mix: output id {clash!r} is both an input id and a repeat's id; rename the input document")
    out.sort(key=lambda r: _order_key(cfg.seed, r["id"]))
    report = _report(docs, empty, cfg, tiers, factors, budgets, base)
    return MixResult(records=tuple(out), report=report)


def _check_record(record: Any, n: int) -> str:
    if not isinstance(record, Mapping):
        raise DataError(f"record {n}: expected a JSON object, got {type(record).__name__}")
    doc_id = record.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        raise DataError(f"record {n}: 'id' must be a non-empty string, got {doc_id!r}")
    if not isinstance(record.get("text"), str):
        raise DataError(f"record {n} ({doc_id}): 'text' must be a string")
    if not isinstance(record.get("source"), Mapping):
        raise DataError(f"record {n} ({doc_id}): 'source' must be an object")
    if "mix" in record:
        raise DataError(f"record {n} ({doc_id}) already has a 'mix' field: the input was mixed already")
    return doc_id


def _order_key(seed: int, record_id: str) -> bytes:
    return hashlib.sha256(f"flowpin.mix.order\0{seed}\0{record_id}".encode()).digest()


def _no_survivors_message(
    docs: list[_Doc], empty: list[str], tiers: list[str], caps: list[float], up: UpsamplingConfig
) -> str:
    if not docs:
        return f"mix: all {len(empty)} input documents are blank; nothing to mix"
    per_tier = Counter(tiers[d.tier] for d in docs)
    shown = ", ".join(f"{t}: {per_tier.get(t, 0)} docs, cap {c:g}" for t, c in zip(tiers, caps, strict=True))
    if all(caps[d.tier] == 0 for d in docs):
        kept = [t for t, c in zip(tiers, caps, strict=True) if c > 0]
        fix = (
            f"lower mix.quality.tiers[*].min_score so that documents reach a kept tier ({', '.join(kept)})"
            if kept
            else "give at least one tier a cap > 0"
        )
        return f"mix.upsampling.tier_max_factors: every document falls in a dropped tier ({shown}); {fix}"
    if up.target_shares is not None:
        return (
            "mix.upsampling.target_shares: every topic with kept documents has share 0 "
            f"({shown}); give those topics a share"
        )
    return f"mix.upsampling.token_budget: {up.token_budget} tokens leave no document ({shown}); raise the budget"


def _round(value: float) -> float:
    return round(value, 4)


def _report(
    docs: list[_Doc],
    empty: list[str],
    cfg: MixConfig,
    tiers: list[str],
    factors: Mapping[tuple[str, int], float],
    budgets: Mapping[str, float],
    base: Mapping[tuple[str, int], int],
) -> dict[str, Any]:
    up = cfg.upsampling
    total_tokens = sum(d.tokens * d.copies for d in docs)
    records = sum(d.copies for d in docs)
    table = []
    for topic in cfg.topics.produced():
        for i, tier in enumerate(tiers):
            bucket = [d for d in docs if d.topic == topic and d.tier == i]
            if not bucket:
                continue
            tokens = sum(d.tokens * d.copies for d in bucket)
            table.append(
                {
                    "topic": topic,
                    "tier": tier,
                    "documents": len(bucket),
                    "kept_documents": sum(1 for d in bucket if d.copies),
                    "records": sum(d.copies for d in bucket),
                    "base_tokens": base[(topic, i)],
                    "tokens": tokens,
                    "share": _round(tokens / total_tokens) if total_tokens else 0,
                    "factor": _round(factors[(topic, i)]),
                    "effective_factor": _round(tokens / base[(topic, i)]),
                }
            )
    topics: dict[str, Any] = {}
    for topic in cfg.topics.produced():
        mine = [d for d in docs if d.topic == topic]
        tokens = sum(d.tokens * d.copies for d in mine)
        entry: dict[str, Any] = {
            "documents": len(mine),
            "base_tokens": sum(d.tokens for d in mine),
            "records": sum(d.copies for d in mine),
            "tokens": tokens,
            "share": _round(tokens / total_tokens) if total_tokens else 0,
        }
        if up.target_shares is not None:
            entry["target_share"] = up.target_shares[topic]
            entry["budget"] = round(budgets[topic])
        topics[topic] = entry
    tiers_report = {
        tier: {
            "min_score": cfg.quality.tiers[i].min_score,
            "max_factor": up.tier_max_factors[tier],
            "documents": sum(1 for d in docs if d.tier == i),
            "records": sum(d.copies for d in docs if d.tier == i),
            "tokens": sum(d.tokens * d.copies for d in docs if d.tier == i),
        }
        for i, tier in enumerate(tiers)
    }
    dropped: dict[str, Any] = {"empty": {"documents": len(empty), "examples": sorted(empty)[:_MAX_EXAMPLES]}}
    for reason in ("tier", "budget", "share"):
        gone = sorted((d for d in docs if d.reason == reason), key=lambda d: d.id)
        dropped[reason] = {
            "documents": len(gone),
            "tokens": sum(d.tokens for d in gone),
            "examples": [{"id": d.id, "topic": d.topic, "score": d.score} for d in gone[:_MAX_EXAMPLES]],
        }
    scores: dict[str, Any] = {}
    for topic in cfg.topics.produced():
        values = sorted(d.score for d in docs if d.topic == topic)
        if values:
            scores[topic] = {
                q: values[round(p * (len(values) - 1))]
                for q, p in (("min", 0.0), ("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("max", 1.0))
            }
    return {
        "tokens_estimate": {
            "bytes_per_token": up.bytes_per_token,
            # per-topic ratios only when given, so recipes without them keep their reports' (and datasets') bytes
            **(
                {"note": TOPIC_ESTIMATE_NOTE, "topic_bytes_per_token": dict(up.topic_bytes_per_token)}
                if up.topic_bytes_per_token
                else {"note": ESTIMATE_NOTE}
            ),
        },
        "input": {
            "documents": len(docs) + len(empty),
            "tokens": sum(d.tokens for d in docs),
        },
        "budget": {
            "token_budget": up.token_budget,
            "tokens": total_tokens,
            "delta": total_tokens - up.token_budget,
            "delta_fraction": _round((total_tokens - up.token_budget) / up.token_budget),
        },
        "output": {"records": records, "documents": sum(1 for d in docs if d.copies)},
        "table": table,
        "topics": topics,
        "tiers": tiers_report,
        "dropped": dropped,
        "scores": scores,
    }


# --- dataset I/O -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixRun:
    """What :func:`run_mix` wrote."""

    records: int
    """Records written (repeats included)."""
    tokens: int
    """Estimated tokens written."""
    shards: tuple[ShardInfo, ...]
    """The shards written, in order."""
    report: dict[str, Any]
    """The :class:`MixResult` report plus ``output.shards``; also stored in the output's ``index.json``."""


def run_mix(cfg: MixConfig, input_dir: Path, out_dir: Path) -> MixRun:
    """Mix the dataset in ``input_dir`` into ``out_dir`` (shards + ``index.json``; must hold no shards)."""
    result = mix_records(read_dataset(input_dir), cfg)
    report = dict(result.report)
    report["output"] = {**report["output"], "shards": math.ceil(len(result.records) / cfg.shards.docs_per_shard)}
    shards = write_dataset(
        result.records,
        out_dir,
        docs_per_shard=cfg.shards.docs_per_shard,
        level=cfg.shards.zstd_level,
        meta={"mix": report},
    )
    if len(shards) != report["output"]["shards"]:
        raise InternalError(f"run_mix: wrote {len(shards)} shards, planned {report['output']['shards']}")
    return MixRun(records=len(result.records), tokens=report["budget"]["tokens"], shards=tuple(shards), report=report)
