"""The byte-level BPE tokenizer: its recipe, training it, and loading it back from ``tokenizer.json``.

A byte-level BPE (HF ``tokenizers``) trained on a text stream. The BPE trainer draws no random numbers:
word and pair counts are exact and ties are broken by token id, so the result depends only on the
training text. Measured with tokenizers 0.23.3: ``RAYON_NUM_THREADS`` 1/2/8/16 and
``TOKENIZERS_PARALLELISM`` on/off gave byte-identical ``tokenizer.json`` at every vocab size tried; the
tokenize stage still runs the library single-threaded (:func:`tokenizers_single_threaded`, entered by
``stages/tokenize_corpus.py``) so the result cannot hinge on that finding. Special tokens come first (ids
``0..k-1``, recipe order). Every tokenizer this module returns has ``encode_special_tokens`` on, so a
literal ``<|endoftext|>`` inside a document is encoded as text and can never fake a document boundary.

Which text the tokenizer is trained on, and reusing the tokenizer of another tokenized dataset, are the
stage's (:mod:`flowpin.data.tokenize`); where ``tokenizer.json`` sits and how it is pinned is the
tokenized format's (:mod:`flowpin.data.tokenized`); what the ids are packed into is
:mod:`flowpin.data.packing`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flowpin.data.packing import INT32_MAX
from flowpin.errors import InternalError, RecipeError, TokenizerError
from flowpin.recipe import check_int

TOKENIZER_SOURCES = ("train", "input")
"""Where the tokenizer comes from: trained on the corpus, or reused from the stage input ``tokenizer``."""
TOKENIZER_ROLE = "tokenizer"
"""The stage input role (``paths.inputs.tokenizer``) naming the tokenized dataset whose tokenizer is reused."""
TRAINING_KEYS = ("min_frequency", "train_max_bytes", "seed")
"""``tokenize.tokenizer`` keys that only mean something when the tokenizer is trained here."""
BYTE_ALPHABET = 256
"""Tokens a byte-level BPE needs before any merge: one per byte."""
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"
"""The variable HF tokenizers reads (on every parallel call) to decide whether to use its thread pool."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """The BPE tokenizer to train or reuse (``tokenize.tokenizer``); validated by the stage's config."""

    source: str = "train"
    """``train``: train a byte-level BPE on the corpus (``vocab_size``, ``min_frequency`` and ``seed``
    required). ``input``: reuse the tokenizer of the tokenized dataset ``paths.inputs.tokenizer`` names
    (the training keys must then be left out; ``vocab_size``, when given, must be its size)."""
    vocab_size: int | None = None
    """Target vocabulary size including special tokens; at least 256 (bytes) + the special tokens. The
    trainer stops early when no pair reaches ``min_frequency`` (``index.json`` records the real size).
    With ``source: input``: optional, the size the reused tokenizer must have."""
    min_frequency: int | None = None
    """A pair is merged only if it occurs at least this often in the training text (>= 1)."""
    special_tokens: tuple[str, ...]
    """Special tokens, given ids ``0..k-1`` in this order; must contain ``eos_token`` and ``pad_token``.
    With ``source: input``: exactly the reused tokenizer's special tokens, in id order."""
    eos_token: str = "<|endoftext|>"  # noqa: S105 (a token, not a password)
    """Appended after every document."""
    pad_token: str = "<|pad|>"  # noqa: S105
    """Fills the last sequence when ``packing.tail`` is ``pad``."""
    train_max_bytes: int | None = None
    """Train on at most this many UTF-8 bytes: documents are taken in a seeded random order until the cap
    (the last one cut at a character boundary). ``None`` trains on the whole corpus."""
    seed: int | None = None
    """Seeds the training sample (the BPE trainer itself draws no random numbers)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if self.source not in TOKENIZER_SOURCES:
            raise RecipeError(
                f"{where}.source: {self.source!r} is not one of {', '.join(TOKENIZER_SOURCES)} "
                f"(train: train one on the corpus; input: reuse paths.inputs.{TOKENIZER_ROLE}'s)"
            )
        if not isinstance(self.special_tokens, tuple) or not all(isinstance(t, str) and t for t in self.special_tokens):
            raise RecipeError(f"{where}.special_tokens: must be a list of non-empty strings")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise RecipeError(f"{where}.special_tokens: {list(self.special_tokens)} lists a token twice")
        for key, token in (("eos_token", self.eos_token), ("pad_token", self.pad_token)):
            if token not in self.special_tokens:
                raise RecipeError(f"{where}.{key}: {token!r} must be one of {where}.special_tokens")
        if self.eos_token == self.pad_token:
            raise RecipeError(f"{where}.pad_token: must differ from eos_token (padding must stay distinguishable)")
        if self.source == "input":
            for key in TRAINING_KEYS:
                if getattr(self, key) is not None:
                    raise RecipeError(
                        f"{where}.{key}: only used to train a tokenizer, but {where}.source is 'input' (the "
                        f"tokenizer is reused from paths.inputs.{TOKENIZER_ROLE}); remove the key"
                    )
        else:
            for key in ("vocab_size", "min_frequency", "seed"):
                if getattr(self, key) is None:
                    raise RecipeError(f"{where}.{key}: missing; required when {where}.source is 'train'")
        floor = BYTE_ALPHABET + len(self.special_tokens)
        if self.vocab_size is not None:
            check_int(self.vocab_size, f"{where}.vocab_size", minimum=0, maximum=INT32_MAX)
            if self.vocab_size < floor:
                raise RecipeError(
                    f"{where}.vocab_size: {self.vocab_size} is too small: a byte-level BPE needs {BYTE_ALPHABET} "
                    f"byte tokens + {len(self.special_tokens)} special tokens = {floor} before its first merge; "
                    "raise it"
                )
        if self.min_frequency is not None:
            check_int(self.min_frequency, f"{where}.min_frequency", minimum=1, maximum=INT32_MAX)
        if self.train_max_bytes is not None:
            check_int(self.train_max_bytes, f"{where}.train_max_bytes", minimum=1, maximum=2**53 - 1)
        if self.seed is not None:
            check_int(self.seed, f"{where}.seed", minimum=0, maximum=2**53 - 1)


@contextlib.contextmanager
def tokenizers_single_threaded() -> Iterator[None]:
    """Run HF tokenizers without its thread pool inside the block; the variable is restored afterwards.

    For entry points only (``stages/tokenize_corpus.py`` wraps its library call in it): the library reads
    :data:`PARALLELISM_ENV` on every parallel call, so setting it before the first call keeps the pool from
    ever starting. Restored on the way out, before the stage's manifest fingerprints the environment: the
    recorded ``envVars`` are the ones the process was started with.
    """
    old = os.environ.get(PARALLELISM_ENV)
    os.environ[PARALLELISM_ENV] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PARALLELISM_ENV, None)
        else:
            os.environ[PARALLELISM_ENV] = old


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (deterministic) and return it.

    The returned tokenizer has ``encode_special_tokens`` on (see the module docstring). Whether the
    library may use its thread pool is the caller's environment (:func:`tokenizers_single_threaded`).
    """
    cfg.validate("tokenize.tokenizer")
    if cfg.source != "train" or cfg.vocab_size is None or cfg.min_frequency is None:  # set when 'train' (validate)
        raise InternalError(f"train_tokenizer: called with a {cfg.source!r} tokenizer recipe; only 'train' trains one")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(cfg.special_tokens):
        if tok.token_to_id(token) != i:  # an internal invariant of the trainer we rely on
            raise TokenizerError(f"special token {token!r} did not get id {i}; the tokenizers library changed")
    tok.encode_special_tokens = True
    return tok


def tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    """The ``tokenizer.json`` bytes of ``tokenizer`` (HF's own serialisation, deterministic)."""
    return tokenizer.to_str().encode("utf-8")


def load_tokenizer(data: bytes, *, where: str) -> Tokenizer:
    """Parse ``tokenizer.json`` bytes (``where`` names the file in errors); special tokens in text stay text."""
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON; also UnicodeDecodeError
        raise TokenizerError(f"{where} is not a tokenizers JSON file ({exc}); rerun the tokenize stage") from exc
    tok.encode_special_tokens = True
    return tok


def special_tokens(tokenizer: Tokenizer) -> list[str]:
    """The tokenizer's special tokens in id order."""
    added = tokenizer.get_added_tokens_decoder()
    return [added[i].content for i in sorted(added) if added[i].special]


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of ``token``; :class:`TokenizerError` if the tokenizer does not know it."""
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise TokenizerError(f"the tokenizer has no token {token!r}; retrain it with it in special_tokens")
    return int(tid)


__all__ = [
    "BYTE_ALPHABET",
    "PARALLELISM_ENV",
    "TOKENIZER_ROLE",
    "TOKENIZER_SOURCES",
    "TRAINING_KEYS",
    "TokenizerConfig",
    "load_tokenizer",
    "special_id",
    "special_tokens",
    "tokenizer_bytes",
    "tokenizers_single_threaded",
    "train_tokenizer",
]
