"""Stage 12, eval: one table of every stage checkpoint's bits-per-byte and pass@1, decontamination attached.

:func:`run_eval` composes the eval modules; each owns one concern:

* :mod:`flowpin.post.eval_config` -- the recipe (``eval`` in ``params/eval.yaml``), validated.
* :mod:`flowpin.post.eval_inputs` -- what is evaluated, found and checked before any model runs: the latest
  checkpoint of each listed stage; held-out text (standard-library source files the reference corpus did
  not ingest, refused when their sha256 or path is among the ingest stage's source records); the first
  ``per_kind`` held-out tasks of each kind; the decontamination report, checked against the digest its
  signed manifest pins, against the synth held-out set and against the synth data evaluated here.
* :mod:`flowpin.post.eval_metrics` -- the measurements: **bits per byte** (each document preceded by EOS,
  cut into fixed windows of ``eval.text.window`` predicted tokens with the context reset at each window;
  one window length for every checkpoint, so the long-context ones are measured on the same footing) and
  **pass@1** of greedy responses (argmax, no random numbers), graded by the verifier registered for each
  task's kind (:func:`flowpin.post.verifiers.verify`), per kind and micro-averaged.
* :mod:`flowpin.post.eval_report` -- the table (``eval.json``, canonical JSON), the same as Markdown
  (``eval.md``), every greedy response and its grade (``responses.json``), the decontamination report byte for
  byte (``decontamination.json``) and the stage report's summary.

Nothing written depends on time, host or path: two runs on one machine write the same bytes. The library
takes values and paths and returns values: the entry point (``stages/eval.py``) fixes seeds, threads and
deterministic kernels first and passes what it set (``determinism``) in, and does the recording.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flowpin.errors import TokenizerError
from flowpin.post.eval_config import EvalConfig
from flowpin.post.eval_inputs import (
    EvalInputs,
    check_heldout_disjoint,
    encode_heldout,
    heldout_tasks,
    read_heldout_text,
)
from flowpin.post.eval_metrics import bits_per_byte, greedy_responses, kind_counts, pass_at_1
from flowpin.post.eval_report import checkpoint_row, eval_table, response_records, run_report, write_outputs
from flowpin.post.verifiers import verifiers_by_kind, verify
from flowpin.train.checkpoint import state_digest
from flowpin.train.run import load_weights


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    """What :func:`run_eval` wrote, as values."""

    table: dict[str, Any]
    """``eval.json``'s content (:func:`flowpin.post.eval_report.eval_table`)."""
    report: dict[str, Any]
    """The stage report (:func:`flowpin.post.eval_report.run_report`)."""


def run_eval(
    cfg: EvalConfig,
    inputs: EvalInputs,
    out_dir: Path,
    *,
    determinism: Mapping[str, Any],
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate every checkpoint of ``inputs`` and write the table into ``out_dir`` (see the module docstring).

    ``determinism`` is what the entry point set before calling this
    (:func:`flowpin.train.distributed.set_deterministic` with ``cfg.seed`` and ``cfg.threads``); it is copied
    into the report. Each model is built with ``cfg.seed`` before its weights are loaded.
    """
    vocab = inputs.vocab
    vocab_size = vocab.tokenizer.get_vocab_size()
    docs = read_heldout_text(inputs.stdlib_root, cfg.text.files)
    ingest_records = check_heldout_disjoint(docs, inputs.ingest_dir)
    doc_ids = [encode_heldout(vocab, d) for d in docs]
    n_bytes = sum(d.bytes for d in docs)
    tasks = heldout_tasks(inputs.synth_dir, cfg.tasks.per_kind)
    kinds = kind_counts(tasks)
    verifiers = verifiers_by_kind(kinds)  # every kind must have a verifier before any model runs

    rows: list[dict[str, Any]] = []
    responses: dict[str, list[dict[str, Any]]] = {}
    for stage, ref in inputs.checkpoints.items():
        model, model_cfg = load_weights(ref.path, seed=cfg.seed)
        if model_cfg.vocab_size != vocab_size:
            raise TokenizerError(
                f"{ref.path.parent}/model.json: vocab_size {model_cfg.vocab_size}, but the tokenizer has "
                f"{vocab_size}: point paths.inputs.tokenizer at the tokenized data {stage} was trained on"
            )
        bpb = bits_per_byte(
            model,
            doc_ids,
            n_bytes=n_bytes,
            window=cfg.text.window,
            context_id=vocab.eos_id,
            pad_id=vocab.pad_id,
            batch_size=cfg.text.batch_size,
        )
        answers = greedy_responses(
            model,
            vocab,
            [t.prompt for t in tasks],
            max_new_tokens=cfg.tasks.max_new_tokens,
            batch_size=cfg.tasks.batch_size,
            max_len=model_cfg.max_sequence_length,
        )
        del model
        gc.collect()
        passed = [verify(t, a.text) for t, a in zip(tasks, answers, strict=True)]
        scores = pass_at_1(tasks, passed)
        rows.append(
            checkpoint_row(
                stage,
                checkpoint_name=ref.path.name,
                step=ref.step,
                state_sha256=state_digest(ref.path),
                context=model_cfg.max_sequence_length,
                bpb=bpb,
                scores=scores,
                responses=answers,
            )
        )
        responses[stage] = response_records(tasks, answers, passed)
        if progress is not None:
            o = scores["overall"]
            progress(f"{stage} {ref.path.name}: {bpb.bits_per_byte:.4f} bits/byte, pass@1 {o['passed']}/{o['n']}")

    table = eval_table(
        stdlib_uri=inputs.stdlib_uri,
        docs=docs,
        doc_ids=doc_ids,
        window=cfg.text.window,
        context_id=vocab.eos_id,
        ingest_records=ingest_records,
        tasks=tasks,
        tasks_cfg=cfg.tasks,
        kinds=kinds,
        verifiers=verifiers,
        decontamination=inputs.decontamination.summary,
        rows=rows,
    )
    write_outputs(out_dir, table=table, responses=responses, decontamination_raw=inputs.decontamination.raw)
    return EvalResult(table=table, report=run_report(table, determinism=determinism))
