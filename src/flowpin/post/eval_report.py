"""The eval table and the files it is written to: ``eval.json``, ``eval.md``, ``responses.json``, the report.

Pure assembly of what :mod:`flowpin.post.eval_metrics` measured on the inputs of
:mod:`flowpin.post.eval_inputs`: :func:`checkpoint_row` (one stage checkpoint's scores), :func:`eval_table`
(every row with what was measured and how), :func:`render_markdown` (the same table for people),
:func:`run_report` (the stage report's summary) and :func:`write_outputs` (the four files of ``paths.out``).

Nothing in them depends on time, host or path: the same measurements give the same bytes. ``eval.json`` and
``responses.json`` are canonical JSON (:func:`flowpin.canonical.canonical_json`); ``decontamination.json`` is
the decontamination report byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.synth import Task
from flowpin.post.eval_config import TasksConfig
from flowpin.post.eval_inputs import HELDOUT_SPLIT, HeldoutDoc
from flowpin.post.eval_metrics import BitsPerByte, Response, token_windows
from flowpin.post.verifiers import GRADER

TABLE_VERSION = 1
"""Version of the ``eval.json`` layout."""
TABLE_NAME = "eval.json"
MARKDOWN_NAME = "eval.md"
RESPONSES_NAME = "responses.json"
DECONTAMINATION_NAME = "decontamination.json"
"""The copy of the decontamination report, named in the table's ``decontamination.file``."""


def checkpoint_row(
    stage: str,
    *,
    checkpoint_name: str,
    step: int,
    state_sha256: str,
    context: int,
    bpb: BitsPerByte,
    scores: Mapping[str, Any],
    responses: Sequence[Response],
) -> dict[str, Any]:
    """One table row: a stage's checkpoint (directory name, step, state digest), its model's context, bits
    per byte and nats per token, pass@1 (:func:`flowpin.post.eval_metrics.pass_at_1`) and how many
    responses ran out of tokens before a stop token."""
    return {
        "stage": stage,
        "checkpoint": {"name": checkpoint_name, "step": step, "state_sha256": state_sha256},
        "context": context,
        "bits_per_byte": bpb.bits_per_byte,
        "nats_per_token": bpb.nats_per_token,
        "pass_at_1": scores,
        "responses_unstopped": sum(not r.stopped for r in responses),
    }


def response_records(
    tasks: Sequence[Task], responses: Sequence[Response], passed: Sequence[bool]
) -> list[dict[str, Any]]:
    """``responses.json``'s list for one checkpoint: each task's id, the greedy response and its grade."""
    return [{"id": t.id, "response": r.text, "passed": ok} for t, r, ok in zip(tasks, responses, passed, strict=True)]


def eval_table(
    *,
    stdlib_uri: str,
    docs: Sequence[HeldoutDoc],
    doc_ids: Sequence[Sequence[int]],
    window: int,
    context_id: int,
    ingest_records: int,
    tasks: Sequence[Task],
    tasks_cfg: TasksConfig,
    kinds: Mapping[str, int],
    verifiers: Mapping[str, str],
    decontamination: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """``eval.json``: the held-out text (``docs`` tokenized as ``doc_ids``, cut into windows of ``window``
    after ``context_id``), the tasks (``kinds``: tasks per kind; ``verifiers``: the verifier name of each
    kind), the decontamination summary (with the name of its copy, :data:`DECONTAMINATION_NAME`) and
    ``rows`` (:func:`checkpoint_row`)."""
    return {
        "format": {"version": TABLE_VERSION},
        "text": {
            "source": stdlib_uri,
            "files": [
                {"path": d.path, "bytes": d.bytes, "sha256": d.sha256, "tokens": len(ids)}
                for d, ids in zip(docs, doc_ids, strict=True)
            ],
            "bytes": sum(d.bytes for d in docs),
            "tokens": sum(len(ids) for ids in doc_ids),
            "window": window,
            "windows": sum(len(token_windows(ids, window=window, context_id=context_id)) for ids in doc_ids),
            "ingest_records_checked": ingest_records,
        },
        "tasks": {
            "split": HELDOUT_SPLIT,
            "per_kind": tasks_cfg.per_kind,
            "kinds": dict(kinds),
            "ids": [t.id for t in tasks],
            "decoding": "greedy",
            "max_new_tokens": tasks_cfg.max_new_tokens,
            "verifier": {"function": GRADER, "by_kind": dict(verifiers)},
        },
        "decontamination": {"file": DECONTAMINATION_NAME, **decontamination},
        "rows": list(rows),
    }


def run_report(table: Mapping[str, Any], *, determinism: Mapping[str, Any]) -> dict[str, Any]:
    """The stage report (``paths.report``): the ``determinism`` the entry point set, what was measured, and
    each stage's step, bits per byte and pass@1 (overall and per kind)."""
    text = table["text"]
    return {
        "determinism": determinism,
        "text": {"bytes": text["bytes"], "tokens": text["tokens"], "window": text["window"]},
        "tasks": len(table["tasks"]["ids"]),
        "stages": {
            r["stage"]: {
                "step": r["checkpoint"]["step"],
                "bits_per_byte": r["bits_per_byte"],
                "pass_at_1": r["pass_at_1"]["overall"]["pass_at_1"],
                "pass_at_1_by_kind": {k: v["pass_at_1"] for k, v in r["pass_at_1"]["by_kind"].items()},
            }
            for r in table["rows"]
        },
    }


def write_outputs(
    out_dir: Path,
    *,
    table: Mapping[str, Any],
    responses: Mapping[str, Sequence[Mapping[str, Any]]],
    decontamination_raw: bytes,
) -> None:
    """Write ``eval.json``, ``eval.md``, ``responses.json`` and ``decontamination.json`` into ``out_dir``
    (each atomically)."""
    atomic_write_bytes(out_dir / TABLE_NAME, canonical_json(table) + b"\n")
    atomic_write_bytes(out_dir / MARKDOWN_NAME, render_markdown(table).encode("utf-8"))
    atomic_write_bytes(out_dir / RESPONSES_NAME, canonical_json(responses) + b"\n")
    atomic_write_bytes(out_dir / DECONTAMINATION_NAME, decontamination_raw)


def render_markdown(table: Mapping[str, Any]) -> str:
    """``eval.md``: what was measured, the decontamination summary, and one row per stage checkpoint."""
    text, tasks, decon = table["text"], table["tasks"], table["decontamination"]
    kinds = list(tasks["kinds"])
    lines = [
        "# Eval",
        "",
        f"* **bits/byte**: {text['bytes']} UTF-8 bytes ({text['tokens']} tokens) of held-out Python source "
        f"({text['source']}: {', '.join(f['path'] for f in text['files'])}), none of it in the ingested corpus; "
        f"windows of {text['window']} predicted tokens, context reset at each window, each file preceded by EOS.",
        f"* **pass@1**: greedy decoding, one response per task (at most {tasks['max_new_tokens']} tokens, stop at "
        f"EOS or newline), graded by `{tasks['verifier']['function']}` ("
        + ", ".join(f"{k}: {v}" for k, v in tasks["verifier"]["by_kind"].items())
        + "); the first "
        f"{'all' if tasks['per_kind'] is None else tasks['per_kind']} held-out tasks of each kind "
        f"({', '.join(f'{k}: {n}' for k, n in tasks['kinds'].items())}).",
        f"* **decontamination** ({decon['source']}, copied to `{decon['file']}`): training documents sharing a "
        f"{decon['ngram']['n']}-gram with an evaluation set were removed before training: "
        + "; ".join(f"{e['name']} ({e['items']} items): {e['documents_removed']} removed" for e in decon["evals"])
        + f"; {decon['removed_expansion']} more by cluster expansion; {decon['documents_out']} of "
        f"{decon['documents_in']} documents kept. Held-out sets checked: {', '.join(decon['heldout_sets'])}.",
        "",
        "| stage | checkpoint step | bits/byte | "
        + " | ".join(f"pass@1 {k}" for k in kinds)
        + " | pass@1 overall | n |",
        "|---|---:|---:|" + "---:|" * len(kinds) + "---:|---:|",
    ]
    for row in table["rows"]:
        p = row["pass_at_1"]
        cells = [_rate(p["by_kind"].get(k)) for k in kinds]
        lines.append(
            f"| {row['stage']} | {row['checkpoint']['step']} | {row['bits_per_byte']:.4f} | "
            + " | ".join(cells)
            + f" | {_rate(p['overall'])} | {p['overall']['n']} |"
        )
    return "\n".join(lines) + "\n"


def _rate(cell: Mapping[str, Any] | None) -> str:
    if cell is None or not cell["n"]:
        return "-"
    return f"{cell['pass_at_1']:.3f} ({cell['passed']}/{cell['n']})"
