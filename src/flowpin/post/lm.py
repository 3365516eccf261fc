"""Log-probabilities and seeded generation with the megatron GPT (no KV cache: the models are tiny).

Everything here is deterministic on one machine: forward passes use the deterministic kernels the stage
set, and sampling draws only from the ``torch.Generator`` passed in (seed it from the recipe and the
step, never from global state). Batched generation right-pads: each row reads the logits at its own
last position, and causal attention keeps the padding after it from influencing anything before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flowpin.errors import InternalError
from flowpin.recipe import check_float, check_int


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` next-token logits of ``ids`` ``[B, T]`` (positions 0..T-1, causal mask)."""
    positions = torch.arange(ids.shape[1], dtype=torch.long, device=ids.device).unsqueeze(0).expand_as(ids)
    out: torch.Tensor = model(ids, positions, None)
    return out


def token_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]``: log p(ids[:, t+1] | ids[:, :t+1]) in float32 (gradients flow if the model has them)."""
    logp = F.log_softmax(logits(model, ids[:, :-1]).float(), dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def masked_logprob_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: the sum of log-probabilities of the tokens where ``mask`` (``[B, T]``, over ``ids``) is 1."""
    return (token_logprobs(model, ids) * mask[:, 1:].float()).sum(dim=-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How responses are generated (keys ``sampling.*`` of a recipe)."""

    max_new_tokens: int = 48
    """Tokens generated at most per response (an answer line is ~10-30 tokens)."""
    temperature: float = 1.0
    """0: greedy (argmax, no random numbers); otherwise softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""

    def __post_init__(self) -> None:
        check_int(self.max_new_tokens, "sampling.max_new_tokens", minimum=1, maximum=4096)
        check_float(self.temperature, "sampling.temperature", minimum=0.0)
        check_int(self.top_k, "sampling.top_k", minimum=0)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    cfg: SamplingConfig,
    stop_ids: Sequence[int],
    pad_id: int,
    max_len: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue every prompt; returns each row's new tokens up to and including the first stop token.

    ``stop_ids`` end a row (EOS, newline tokens). ``generator`` is required when ``cfg.temperature > 0``.
    Rows whose prompt plus ``cfg.max_new_tokens`` exceed ``max_len`` (the model's context) stop at it.
    """
    if cfg.temperature > 0 and generator is None:
        raise InternalError("sampling with temperature > 0 needs a seeded torch.Generator")
    was_training = model.training
    model.eval()
    try:
        lengths = [len(p) for p in prompts]
        if min(lengths, default=1) < 1:
            raise InternalError("every prompt needs at least one token")
        width = min(max(lengths, default=1) + cfg.max_new_tokens, max_len)
        buffer = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            buffer[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
        out: list[list[int]] = [[] for _ in prompts]
        active = [length < width for length in lengths]
        cursor = list(lengths)
        for _ in range(cfg.max_new_tokens):
            if not any(active):
                break
            right = max(c for c, a in zip(cursor, active, strict=True) if a)
            step_logits = logits(model, buffer[:, :right]).float()
            rows = torch.tensor([i for i, a in enumerate(active) if a], dtype=torch.long)
            last = step_logits[rows, torch.tensor([cursor[i] - 1 for i in rows.tolist()], dtype=torch.long)]
            chosen = _choose(last, cfg, generator)
            for i, token in zip(rows.tolist(), chosen.tolist(), strict=True):
                buffer[i, cursor[i]] = token
                out[i].append(int(token))
                cursor[i] += 1
                if bool((stops == token).any()) or cursor[i] >= width:
                    active[i] = False
        return out
    finally:
        model.train(was_training)


def _choose(row_logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature == 0:
        return row_logits.argmax(dim=-1)
    scaled = row_logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(scaled, min(cfg.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled.double(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
