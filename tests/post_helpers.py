"""Post-training test helpers shared by tests/post/ (SFT, DPO, RLVR): synth tasks, their vocabulary, a table
model whose logits are parameters, and a tiny megatron GPT config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import Tokenizer

from flowpin.data.synth import Task
from flowpin.data.tokenizer import TokenizerConfig, train_tokenizer
from flowpin.post.prompts import Vocab
from flowpin.train.transformer import ModelConfig


def make_tasks() -> list[Task]:
    rows = [
        ("arithmetic", "What is 3 + 4?", "3 + 4 = 7. Answer: 7", "7"),
        ("arithmetic", "What is 12 * 3?", "12 * 3 = 36. Answer: 36", "36"),
        ("arithmetic", "What is 9 - 5 + 2?", "9 - 5 = 4. 4 + 2 = 6. Answer: 6", "6"),
        ("arithmetic", "What is 40 / 8?", "40 / 8 = 5. Answer: 5", "5"),
        ("word_problem", "Ann has 3 pens and buys 2 more. How many pens now?", "3 + 2 = 5. Answer: 5", "5"),
        (
            "word_problem",
            "Bo has 4 cups; Cy has 2 times as many. How many in total?",
            "4 + 4 * 2 = 12. Answer: 12",
            "12",
        ),
    ]
    return [
        Task(id=f"synth/train/{kind}/{i}", kind=kind, prompt=p, solution=s, answer=a)
        for i, (kind, p, s, a) in enumerate(rows)
    ]


def make_vocab(tasks: Sequence[Task]) -> Vocab:
    cfg = TokenizerConfig(
        vocab_size=320, min_frequency=1, special_tokens=("<|endoftext|>", "<|pad|>"), seed=0, train_max_bytes=None
    )
    tok: Tokenizer = train_tokenizer([t.text for t in tasks] * 3, cfg)
    return Vocab(tokenizer=tok, eos_id=0, pad_id=1)


class TableLM(torch.nn.Module):
    """``logits[b, t] = table[t]``: every position's next-token logits are free parameters."""

    def __init__(self, vocab_size: int, width: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(width, vocab_size, generator=gen))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Any) -> torch.Tensor:
        return self.table[: ids.shape[1]].unsqueeze(0).expand(ids.shape[0], -1, -1)


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=vocab_size,
        max_sequence_length=64,
        sliding_window=32,
    )
