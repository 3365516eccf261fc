"""The mix recipe (``mix`` in ``params/mix.yaml``): its typed configs and every rule they are held to.

One dataclass per block of the recipe -- the topic classifier (:class:`TopicsConfig` and its rules,
:class:`TopicRule`), the quality scorer (:class:`QualityConfig`: :class:`FeaturesConfig`, the tiers as
:class:`TierConfig`), the repetition caps and token budget (:class:`UpsamplingConfig`) -- composed by
:class:`MixConfig`, which validates the whole recipe on construction and names the first invalid key
(:class:`~flowpin.errors.RecipeError`, :class:`~flowpin.errors.UnknownTopicError` for a topic no rule
produces). What the values mean for the mix, and the computation itself, are :mod:`flowpin.data.mix`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping

from flowpin.data.shards import ShardConfig
from flowpin.errors import RecipeError, UnknownTopicError
from flowpin.frozen import FrozenDict
from flowpin.recipe import check_float, check_int

FACTOR_CAP = 16.0
"""Largest repetition factor any recipe may ask for (OLMo 3 caps at 7; beyond 16 is surely a typo)."""
FEATURES = (
    "length_bytes",
    "alpha_fraction",
    "mean_line_chars",
    "long_line_fraction",
    "duplicate_line_fraction",
    "comment_fraction",
)
"""Quality features, in report order (see :class:`FeaturesConfig`)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHARE_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopicRule:
    """One classifier rule (``mix.topics.rules[i]``): all given conditions must hold (AND).

    Globs use :func:`fnmatch.fnmatchcase` (``*`` also matches ``/``); a condition on a field the record
    lacks does not match.
    """

    topic: str
    """Topic assigned when the rule matches. ``[A-Za-z0-9_.-]``."""
    origin: str | None = None
    """Glob on ``source.origin`` (``python-stdlib *``, ``flowpin-synth``)."""
    generator: str | None = None
    """Glob on ``source.generator`` (synthetic data: ``arithmetic``, ``word_problem``)."""
    path: str | None = None
    """Glob on ``source.path`` (``*.py``, ``pydoc_data/topics.py#*``)."""
    task_kind: str | None = None
    """Glob on ``task.kind`` (records with a ``task`` field)."""
    text_regex: str | None = None
    """Python regex searched (``re.search``) in the text; put flags inline (``(?m)``, ``(?i)``)."""
    min_bytes: int | None = None
    """The text's UTF-8 length is at least this many bytes (>= 1): a length-based bucket, e.g. the long
    documents of a long-context mix (tokens are about ``bytes / upsampling.bytes_per_token``)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        _check_name(self.topic, f"{where}.topic")
        globs = {
            "origin": self.origin,
            "generator": self.generator,
            "path": self.path,
            "task_kind": self.task_kind,
            "text_regex": self.text_regex,
        }
        if all(v is None for v in globs.values()) and self.min_bytes is None:
            raise RecipeError(
                f"{where}: a rule needs at least one condition ({', '.join(globs)}, min_bytes); "
                "use mix.topics.default_topic for documents no rule matches"
            )
        for key, value in globs.items():
            if value is not None and not value:
                raise RecipeError(f"{where}.{key}: must be a non-empty string or null")
        if self.min_bytes is not None:
            check_int(self.min_bytes, f"{where}.min_bytes", minimum=1)
        if self.text_regex is not None:
            try:
                re.compile(self.text_regex)
            except re.error as exc:
                raise RecipeError(f"{where}.text_regex: {self.text_regex!r} is not a valid regex ({exc})") from exc


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopicsConfig:
    """The topic classifier (``mix.topics``)."""

    rules: tuple[TopicRule, ...]
    """Rules in priority order; the first match wins."""
    default_topic: str
    """Topic of a document no rule matches."""

    def produced(self) -> list[str]:
        """Every topic the classifier can produce, sorted."""
        return sorted({r.topic for r in self.rules} | {self.default_topic})


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """How one feature enters the score: its weight and its band."""

    weight: float
    """Weight in the score's weighted mean (>= 0; 0 ignores the feature)."""
    band: tuple[float, ...]
    """Trapezoid ``[zero_below, full_from, full_to, zero_above]`` (non-decreasing) mapping the raw value to
    [0, 1]: 0 at or below ``zero_below``, rising linearly to 1 at ``full_from``, 1 up to ``full_to``,
    falling linearly to 0 at ``zero_above`` and beyond. Equal neighbours make a step."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeaturesConfig:
    """The quality features (``mix.quality.features``); all are measured on the document text.

    "Lines" are the text split on ``\\n``; "non-blank lines" those with a non-whitespace character,
    right-stripped.
    """

    length_bytes: FeatureConfig
    """UTF-8 length of the text in bytes: too short carries little, huge files are often tables."""
    alpha_fraction: FeatureConfig
    """Letters (``str.isalpha``) / non-whitespace characters: low for numeric tables, encoded data."""
    mean_line_chars: FeatureConfig
    """Mean length of the non-blank lines in characters: very short or very long lines are unnatural."""
    long_line_fraction: FeatureConfig
    """Fraction of non-blank lines longer than ``quality.long_line_chars``: generated/minified text."""
    duplicate_line_fraction: FeatureConfig
    """Fraction of the stripped non-blank lines of at least ``quality.duplicate_min_chars`` characters
    that repeat an earlier such line of the same document: boilerplate, copy-paste."""
    comment_fraction: FeatureConfig
    """Fraction of non-blank lines that are ``#`` comments or inside a triple-quoted string that starts a
    line (docstrings): documentation density of code. A line heuristic, not a parser."""

    def get(self, name: str) -> FeatureConfig:
        """The config of feature ``name`` (one of :data:`FEATURES`)."""
        value: FeatureConfig = getattr(self, name)
        return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class TierConfig:
    """One quality tier (``mix.quality.tiers[i]``)."""

    name: str
    """Tier name (``high``, ``medium``, ``low``). ``[A-Za-z0-9_.-]``."""
    min_score: float
    """Lowest score in this tier; strictly decreasing down the list, and 0 for the last tier."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """The quality scorer and its tiers (``mix.quality``)."""

    features: FeaturesConfig
    """Weight and band of every feature."""
    tiers: tuple[TierConfig, ...]
    """Tiers, best first; a document gets the first tier whose ``min_score`` its score reaches."""
    long_line_chars: int
    """A non-blank line longer than this many characters counts for ``long_line_fraction``."""
    duplicate_min_chars: int
    """Stripped lines shorter than this are ignored by ``duplicate_line_fraction`` (``else:``, ``)``...)."""
    topic_weights: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=FrozenDict)
    """Per-topic weight overrides: ``{topic: {feature: weight}}``; unlisted features keep their weight."""

    def weights(self, topic: str) -> dict[str, float]:
        """Effective feature weights for ``topic``."""
        base = {name: self.features.get(name).weight for name in FEATURES}
        return {**base, **self.topic_weights.get(topic, {})}


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpsamplingConfig:
    """Repetition factors and the token budget (``mix.upsampling``)."""

    token_budget: int
    """Target number of (estimated) tokens in the mix, repeats included."""
    bytes_per_token: float
    """Estimated UTF-8 bytes per token until the tokenizer exists (BPE on English/code: ~3-4.5)."""
    topic_bytes_per_token: Mapping[str, float] = dataclasses.field(default_factory=FrozenDict)
    """Per-topic overrides of ``bytes_per_token`` (``{topic: ratio}``), e.g. measured with an existing
    tokenizer: short numeric documents (math) give far fewer bytes per token than prose, so one ratio
    skews ``target_shares`` in real tokens. Unlisted topics use ``bytes_per_token``."""
    tier_max_factors: Mapping[str, float]
    """Repetition cap of every tier, by tier name: non-increasing from best to worst, each in
    ``[0, max_factor]``; 0 drops the tier, a cap below 1 keeps at most that fraction of it."""
    max_factor: float = 7.0
    """Ceiling on every tier cap, in [1, 16] (OLMo 3 repeats its top tier up to 7x)."""
    target_shares: Mapping[str, float] | None = None
    """Optional target share of the budget per topic (must name every topic the classifier produces and
    sum to 1; 0 drops a topic). ``None``: topics keep their natural proportions."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixConfig:
    """The mix recipe (``mix`` in ``params/mix.yaml``). Validated on construction."""

    topics: TopicsConfig
    """The topic classifier."""
    quality: QualityConfig
    """The quality scorer and tiers."""
    upsampling: UpsamplingConfig
    """Token budget and repetition caps."""
    shards: ShardConfig
    """Output shard size and compression."""
    seed: int
    """Seed of the output order (the only random choice; it never changes which records are written)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "mix") -> None:
        """Raise :class:`RecipeError` (or :class:`UnknownTopicError`) naming the first invalid key."""
        _validate_topics(self.topics, f"{where}.topics")
        produced = set(self.topics.produced())
        _validate_quality(self.quality, produced, f"{where}.quality")
        _validate_upsampling(self.upsampling, [t.name for t in self.quality.tiers], produced, f"{where}.upsampling")
        self.shards.validate(f"{where}.shards")
        check_int(self.seed, f"{where}.seed", minimum=0)


def _validate_topics(topics: TopicsConfig, where: str) -> None:
    for i, rule in enumerate(topics.rules):
        rule.validate(f"{where}.rules[{i}]")
    _check_name(topics.default_topic, f"{where}.default_topic")


def _validate_quality(quality: QualityConfig, produced: set[str], where: str) -> None:
    for name in FEATURES:
        feature = quality.features.get(name)
        key = f"{where}.features.{name}"
        check_float(feature.weight, f"{key}.weight", minimum=0.0)
        band = feature.band
        if len(band) != 4 or not all(math.isfinite(b) for b in band):
            raise RecipeError(
                f"{key}.band: {list(band)!r} must be 4 finite numbers [zero_below, full_from, full_to, zero_above]"
            )
        if any(a > b for a, b in itertools.pairwise(band)):
            raise RecipeError(f"{key}.band: {list(band)!r} must be non-decreasing")
    for topic, overrides in quality.topic_weights.items():
        if topic not in produced:
            raise UnknownTopicError(
                f"{where}.topic_weights.{topic}: no rule produces topic {topic!r} "
                f"(produced: {', '.join(sorted(produced))}); fix the name or add a rule to mix.topics.rules"
            )
        for name, weight in overrides.items():
            if name not in FEATURES:
                raise RecipeError(
                    f"{where}.topic_weights.{topic}.{name}: unknown feature (known: {', '.join(FEATURES)})"
                )
            check_float(weight, f"{where}.topic_weights.{topic}.{name}", minimum=0.0)
    for overridden in [None, *sorted(quality.topic_weights)]:
        weights = quality.weights(overridden or "")
        if sum(weights.values()) <= 0:
            key = f"{where}.topic_weights.{overridden}" if overridden else f"{where}.features"
            raise RecipeError(f"{key}: every feature weight is 0; give at least one feature a positive weight")
    if not quality.tiers:
        raise RecipeError(f"{where}.tiers: list at least one tier, e.g. {{name: high, min_score: 0}}")
    seen: set[str] = set()
    previous = math.inf
    for i, tier in enumerate(quality.tiers):
        key = f"{where}.tiers[{i}]"
        _check_name(tier.name, f"{key}.name")
        if tier.name in seen:
            raise RecipeError(f"{key}.name: tier {tier.name!r} is listed twice")
        seen.add(tier.name)
        check_float(tier.min_score, f"{key}.min_score", minimum=0.0, maximum=1.0)
        if tier.min_score >= previous:
            raise RecipeError(f"{key}.min_score: {tier.min_score} must be below the previous tier's {previous}")
        previous = tier.min_score
    if quality.tiers[-1].min_score != 0:
        raise RecipeError(
            f"{where}.tiers[{len(quality.tiers) - 1}].min_score: the last tier must start at 0 so that "
            "every document gets a tier"
        )
    check_int(quality.long_line_chars, f"{where}.long_line_chars", minimum=1)
    check_int(quality.duplicate_min_chars, f"{where}.duplicate_min_chars", minimum=0)


def _validate_upsampling(up: UpsamplingConfig, tiers: list[str], produced: set[str], where: str) -> None:
    check_int(up.token_budget, f"{where}.token_budget", minimum=1)
    check_float(up.bytes_per_token, f"{where}.bytes_per_token", minimum=0.0, maximum=64.0)
    if up.bytes_per_token <= 0:
        raise RecipeError(f"{where}.bytes_per_token: must be > 0 (about 4 for English and code)")
    for topic, ratio in up.topic_bytes_per_token.items():
        key = f"{where}.topic_bytes_per_token.{topic}"
        if topic not in produced:
            raise UnknownTopicError(
                f"{key}: no rule produces topic {topic!r} (produced: {', '.join(sorted(produced))}); "
                "fix the name or add a rule to mix.topics.rules"
            )
        check_float(ratio, key, minimum=0.0, maximum=64.0)
        if ratio <= 0:
            raise RecipeError(f"{key}: must be > 0 (about 4 for English and code)")
    check_float(up.max_factor, f"{where}.max_factor", minimum=-math.inf)
    if not 1 <= up.max_factor <= FACTOR_CAP:
        raise RecipeError(
            f"{where}.max_factor: {up.max_factor:g} is outside 1..{FACTOR_CAP:g} (OLMo 3 repeats its top tier "
            "at most 7x); set it within that range"
        )
    for name in up.tier_max_factors:
        if name not in tiers:
            raise RecipeError(f"{where}.tier_max_factors.{name}: not a tier (tiers: {', '.join(tiers)}); fix the name")
    previous: tuple[str, float] | None = None
    for name in tiers:
        key = f"{where}.tier_max_factors.{name}"
        if name not in up.tier_max_factors:
            raise RecipeError(f"{key}: missing; give every tier a cap (0 drops it)")
        factor = up.tier_max_factors[name]
        check_float(factor, key, minimum=-math.inf)
        if not 0 <= factor <= up.max_factor:
            raise RecipeError(
                f"{key}: {factor:g} is outside 0..{up.max_factor:g} (mix.upsampling.max_factor); use 0 to drop the tier"
            )
        if previous is not None and factor > previous[1]:
            raise RecipeError(
                f"{key}: {factor:g} is above the better tier {previous[0]!r}'s {previous[1]:g}; "
                "caps must not increase as quality falls"
            )
        previous = (name, factor)
    if up.target_shares is not None:
        for topic, share in up.target_shares.items():
            key = f"{where}.target_shares.{topic}"
            if topic not in produced:
                raise UnknownTopicError(
                    f"{key}: no rule produces topic {topic!r} (produced: {', '.join(sorted(produced))}); "
                    "fix the name or add a rule to mix.topics.rules"
                )
            check_float(share, key, minimum=0.0, maximum=1.0)
        missing = sorted(produced - set(up.target_shares))
        if missing:
            raise RecipeError(
                f"{where}.target_shares.{missing[0]}: missing; list every produced topic "
                f"({', '.join(sorted(produced))}), 0 to drop one"
            )
        total = math.fsum(up.target_shares.values())
        if abs(total - 1.0) > _SHARE_TOLERANCE:
            raise RecipeError(f"{where}.target_shares: the shares sum to {total:g}, not 1; rescale them")


def _check_name(value: object, key: str) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise RecipeError(f"{key}: {value!r} must start with a letter or digit and use only letters, digits, _ . -")


__all__ = [
    "FACTOR_CAP",
    "FEATURES",
    "FeatureConfig",
    "FeaturesConfig",
    "MixConfig",
    "QualityConfig",
    "TierConfig",
    "TopicRule",
    "TopicsConfig",
    "UpsamplingConfig",
]
