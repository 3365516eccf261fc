"""What the eval stage measures: bits per byte on held-out text, greedy responses and pass@1 on held-out tasks.

Pure measurements: a model and values in, values out; no files, no global state, no random numbers.

* **Bits per byte** (:func:`bits_per_byte`): every token of each document (preceded by EOS, as documents
  follow an EOS in the packed training data) is predicted once, in fixed windows of ``window`` predicted
  tokens (:func:`token_windows`), each window seeing only its own tokens as context. ``bpb = total NLL in
  nats / (ln 2 x UTF-8 bytes)``.
* **Greedy responses** (:func:`greedy_responses`): argmax decoding of one line per prompt.
* **pass@1** (:func:`pass_at_1`): per kind and micro-averaged over all tasks, from grades the verifier
  registry gives (:func:`flowpin.post.verifiers.verify`).

The inputs come from :mod:`flowpin.post.eval_inputs`; the table they fill is :mod:`flowpin.post.eval_report`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from flowpin.data.synth import Task
from flowpin.errors import DataError, InternalError
from flowpin.post.lm import SamplingConfig, generate, token_logprobs
from flowpin.post.prompts import Vocab

# --- bits per byte --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitsPerByte:
    """Negative log-likelihood of a text, in nats, with what it was measured over."""

    nats: float
    tokens: int
    bytes: int
    windows: int

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes)

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens


def token_windows(ids: Sequence[int], *, window: int, context_id: int) -> list[list[int]]:
    """``[context_id, *ids]`` cut into windows of ``window`` predicted tokens (``window + 1`` ids, overlapping
    by one), so each of ``ids`` is predicted exactly once, from the tokens before it in its window."""
    seq = [context_id, *ids]
    return [seq[start : start + window + 1] for start in range(0, len(seq) - 1, window)]


@torch.no_grad()
def bits_per_byte(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int]],
    *,
    n_bytes: int,
    window: int,
    context_id: int,
    pad_id: int,
    batch_size: int,
) -> BitsPerByte:
    """NLL of every token of ``documents`` (each preceded by ``context_id``) over ``n_bytes`` UTF-8 bytes.

    Windows (:func:`token_windows`) are batched in order, right-padded with ``pad_id`` (masked out; causal
    attention keeps padding from affecting earlier positions); log-probabilities are float32, summed in
    float64 in a fixed order.
    """
    if n_bytes < 1:
        raise DataError("bits per byte needs at least one byte of text")
    windows = [w for ids in documents for w in token_windows(ids, window=window, context_id=context_id)]
    nats = 0.0
    tokens = 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width - 1), dtype=torch.float64)
        for row, w in enumerate(chunk):
            ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
            mask[row, : len(w) - 1] = 1.0
        logp = token_logprobs(model, ids).double()
        nats -= float((logp * mask).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise DataError("bits per byte needs at least one token of text")
    return BitsPerByte(nats=nats, tokens=tokens, bytes=n_bytes, windows=len(windows))


# --- greedy responses and pass@1 ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Response:
    """One greedy response."""

    text: str
    """The decoded new tokens (cut at EOS)."""
    tokens: int
    stopped: bool
    """``False`` when it hit ``max_new_tokens`` (or the model's context) before a stop token."""


def greedy_responses(
    model: torch.nn.Module,
    vocab: Vocab,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_len: int,
) -> list[Response]:
    """Greedy one-line responses to ``prompts``: each stops at EOS or at the first token holding a newline."""
    stop_ids = [vocab.eos_id, *vocab.newline_ids()]
    stops = set(stop_ids)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    out: list[Response] = []
    for start in range(0, len(prompts), batch_size):
        ids = [vocab.prompt_ids(p) for p in prompts[start : start + batch_size]]
        for new in generate(model, ids, cfg=cfg, stop_ids=stop_ids, pad_id=vocab.pad_id, max_len=max_len):
            out.append(Response(text=vocab.decode(new), tokens=len(new), stopped=bool(new) and new[-1] in stops))
    return out


def kind_counts(tasks: Sequence[Task]) -> dict[str, int]:
    """Tasks per kind, kinds in order of first appearance."""
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.kind] = counts.get(task.kind, 0) + 1
    return counts


def pass_at_1(tasks: Sequence[Task], passed: Sequence[bool]) -> dict[str, Any]:
    """``{"by_kind": {kind: {n, passed, pass_at_1}}, "overall": {...}}`` (kinds in order of first appearance;
    overall is the micro-average: all passed / all tasks). One grade per task, else :class:`InternalError`."""
    if len(tasks) != len(passed):
        raise InternalError(f"pass_at_1: {len(tasks)} tasks but {len(passed)} grades")

    def cell(n: int, ok: int) -> dict[str, Any]:
        return {"n": n, "passed": ok, "pass_at_1": ok / n if n else None}

    counts: dict[str, list[int]] = {}
    for task, ok in zip(tasks, passed, strict=True):
        entry = counts.setdefault(task.kind, [0, 0])
        entry[0] += 1
        entry[1] += int(ok)
    return {
        "by_kind": {kind: cell(n, ok) for kind, (n, ok) in counts.items()},
        "overall": cell(len(tasks), sum(int(ok) for ok in passed)),
    }
