"""How a verifiable task becomes tokens, for every post-training stage and for eval.

Layout: ``encode(prompt + "\n")`` then ``encode(response)`` then EOS -- the two parts are encoded
separately so the boundary is the same token position whether the response is a reference solution
(SFT, DPO's chosen side), a sample (DPO's rejected side, RLVR) or absent (generation starts right after
the prompt). The pretraining and mid-training mixes saw the same text, ``prompt\nsolution<eos>``.

:func:`open_vocab` opens the pretraining tokenizer (a tokenized dataset directory) as a :class:`Vocab`: the one
way every post-training stage and eval gets its tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from flowpin.data.tokenized import TokenizedDataset
from flowpin.errors import DataError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Vocab:
    """The tokenizer and the ids generation and packing need."""

    tokenizer: Tokenizer
    eos_id: int
    pad_id: int

    def prompt_ids(self, prompt: str) -> list[int]:
        """The tokens a response follows: ``prompt`` and a newline."""
        return list(self.tokenizer.encode(prompt + "\n").ids)

    def response_ids(self, response: str) -> list[int]:
        """``response`` followed by EOS."""
        return [*self.tokenizer.encode(response).ids, self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, cut at the first EOS."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return str(self.tokenizer.decode(ids))

    def newline_ids(self) -> list[int]:
        """Every token whose text contains a newline (a one-line answer ends at any of them)."""
        vocab = self.tokenizer.get_vocab()
        return sorted(i for i in vocab.values() if "\n" in self.tokenizer.decode([i]))


def open_vocab(tokenizer_dir: Path) -> Vocab:
    """The tokenizer of a tokenized dataset (``paths.inputs.tokenizer``: the pretraining data), checked against
    its index, with its EOS and padding ids."""
    data = TokenizedDataset.open(tokenizer_dir)
    return Vocab(tokenizer=data.tokenizer(), eos_id=int(data.eos_id), pad_id=int(data.pad_id))


def pack_example(
    prompt: Sequence[int], response: Sequence[int], *, seq_len: int, pad_id: int, where: str
) -> torch.Tensor:
    """``[2, seq_len]`` int64: row 0 the ids (prompt, response, padding), row 1 the loss mask (1 on response).

    Raises :class:`DataError` naming ``where`` when the example does not fit: lengthen ``seq_len`` or drop
    the example in the recipe -- a silently truncated response would train on a wrong answer.
    """
    total = len(prompt) + len(response)
    if total > seq_len:
        raise DataError(
            f"{where}: prompt + response is {total} tokens, longer than seq_len {seq_len}; raise seq_len in the recipe"
        )
    if not response:
        raise DataError(f"{where}: empty response")
    ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    mask = torch.zeros(seq_len, dtype=torch.long)
    ids[: len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    ids[len(prompt) : total] = torch.tensor(list(response), dtype=torch.long)
    mask[len(prompt) : total] = 1
    return torch.stack([ids, mask])
