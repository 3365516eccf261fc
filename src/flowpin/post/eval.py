"""Stage 12, eval: one table of every stage checkpoint's bits-per-byte and pass@1, decontamination attached.

This module owns what the eval stage measures and how it writes it down:

* **Bits per byte** on held-out text: standard-library source files the reference corpus did not ingest
  (a recipe-listed set; :func:`check_heldout_disjoint` refuses any whose sha256 or path is among the
  ingest stage's source records, so no model of the flow trained on them). Each document is preceded by
  EOS (documents follow an EOS in the packed training data), so every one of its tokens is predicted, and
  the sequence is cut into fixed windows of ``eval.text.window`` predicted tokens, each window seeing only
  its own tokens as context (the context resets at window boundaries). ``bpb = total NLL in nats /
  (ln 2 x UTF-8 bytes)``. One window length (256 by default, the pretraining context) serves every
  checkpoint, so the long-context ones are measured on the same footing.
* **pass@1** on the synth held-out split: greedy decoding (argmax, no random numbers) of one response per
  task, graded by the verifier registered for its kind (:func:`flowpin.post.verifiers.verify`), per kind
  and overall (micro-average). The recipe may cap the tasks per kind; the first ``per_kind`` of each kind
  in held-out order are taken, so the choice is deterministic.
* **Decontamination**: :func:`load_decontamination` checks that the decontaminate report is the one its
  signed manifest vouches for (digest), that the decontaminate stage checked the training data against the
  synth held-out set, and that it saw exactly the synth data evaluated here; the report is copied into the
  output unchanged and summarised in the table.

Output (``paths.out``): ``eval.json`` (the table, canonical JSON), ``eval.md`` (the same as Markdown),
``responses.json`` (every greedy response and its grade) and ``decontamination.json`` (the report,
byte for byte). Nothing in them depends on time, host or path: two runs on one machine write the same
bytes. The library takes values and paths and returns values; the stage script does the recording.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.shards import read_dataset
from flowpin.data.synth import Task, load_tasks
from flowpin.data.tokenize import TokenizedDataset
from flowpin.errors import (
    ArtifactMissingError,
    CheckpointMissingError,
    DataError,
    DecontaminationReportError,
    HeldoutOverlapError,
    RecipeError,
    TokenizerError,
)
from flowpin.post.lm import SamplingConfig, generate, token_logprobs
from flowpin.post.prompts import Vocab
from flowpin.post.verifiers import KIND_VERIFIERS, verifier_for, verify
from flowpin.recipe import StagePaths, check_int
from flowpin.train.checkpoint import CheckpointRef, latest_checkpoint, state_digest
from flowpin.train.distributed import set_deterministic
from flowpin.train.run import load_weights, read_model_config

DATA_ROLES = ("synth", "tokenizer", "decontaminate", "ingest")
"""The ``paths.inputs`` roles that are not checkpoints: held-out tasks, tokenizer, decontamination, corpus."""
HELDOUT_SPLIT = "heldout"
"""The synth split evaluated (``<paths.inputs.synth.data>/heldout``)."""
TABLE_VERSION = 1
"""Version of the ``eval.json`` layout."""
TABLE_NAME = "eval.json"
MARKDOWN_NAME = "eval.md"
RESPONSES_NAME = "responses.json"
DECONTAMINATION_NAME = "decontamination.json"
GRADER = "flowpin.post.verifiers.verify"
"""The grader: the verifier registered for each task's kind (``KIND_VERIFIERS``) must give it full reward."""

_STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*")


# --- configs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutTextConfig:
    """Held-out text for bits-per-byte (``eval.text``)."""

    files: list[str]
    """Standard-library files (POSIX paths relative to the stdlib root) the reference corpus did not ingest;
    each is checked against every ingest source record (sha256 and path) before any model runs."""
    window: int = 256
    """Tokens predicted per forward pass; the context resets at each window. Must not exceed any evaluated
    model's context (256 for pretrain/midtrain)."""
    batch_size: int = 8
    """Windows per forward pass."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if not isinstance(self.files, list) or not self.files:
            raise RecipeError(f"{where}.files: list at least one standard-library file (e.g. asyncio/queues.py)")
        for j, name in enumerate(self.files):
            _check_relative(name, f"{where}.files[{j}]", "the stdlib root")
        if len(set(self.files)) != len(self.files):
            raise RecipeError(f"{where}.files: a file is listed twice")
        check_int(self.window, f"{where}.window", minimum=1, maximum=65536)
        check_int(self.batch_size, f"{where}.batch_size", minimum=1, maximum=4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TasksConfig:
    """The held-out verifiable tasks for pass@1 (``eval.tasks``)."""

    per_kind: int | None = None
    """Evaluate the first ``per_kind`` tasks of each kind (held-out order); ``None``: all of them."""
    max_new_tokens: int = 40
    """Greedy tokens generated at most per response (the longest reference solution is 32 with EOS)."""
    batch_size: int = 8
    """Prompts decoded together (right-padded; a batch stops when all of its rows have stopped)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if self.per_kind is not None:
            check_int(self.per_kind, f"{where}.per_kind", minimum=1)
        check_int(self.max_new_tokens, f"{where}.max_new_tokens", minimum=1, maximum=4096)
        check_int(self.batch_size, f"{where}.batch_size", minimum=1, maximum=4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The eval recipe (``eval`` in ``params/eval.yaml``). Validated on construction."""

    stages: list[str]
    """Stages whose latest checkpoint is evaluated, one table row each, in this order. Each names a
    ``paths.inputs`` role (its checkpoints directory and manifest)."""
    text: HeldoutTextConfig
    """Held-out text for bits-per-byte."""
    tasks: TasksConfig
    """Held-out tasks for pass@1."""
    decontamination_report: str
    """The decontaminate stage's report (repository-relative): checked against that stage's manifest
    (``paths.inputs.decontaminate.manifest``) and copied into the output."""
    threads: int = 1
    """torch intra-op threads (recorded: a different count can change results bitwise). The tiny models'
    small matrices gain little from a second thread and lose much when the cores are shared."""
    seed: int = 0
    """Seeds the global generators (nothing here samples: decoding is greedy)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "eval") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``eval.text.window`` ...)."""
        if not isinstance(self.stages, list) or not self.stages:
            raise RecipeError(f"{where}.stages: list at least one stage whose checkpoints to evaluate")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, str) or not _STAGE_NAME.fullmatch(stage):
                raise RecipeError(f"{where}.stages[{i}]: {stage!r} must be a stage name like 'pretrain'")
            if stage in DATA_ROLES:
                raise RecipeError(
                    f"{where}.stages[{i}]: {stage!r} is a data input role ({', '.join(DATA_ROLES)}), not a stage "
                    "with checkpoints"
                )
        if len(set(self.stages)) != len(self.stages):
            raise RecipeError(f"{where}.stages: {self.stages} lists a stage twice")
        self.text.validate(f"{where}.text")
        self.tasks.validate(f"{where}.tasks")
        _check_relative(self.decontamination_report, f"{where}.decontamination_report", "the repository root")
        check_int(self.threads, f"{where}.threads", minimum=1, maximum=1024)
        check_int(self.seed, f"{where}.seed", minimum=0, maximum=2**32 - 1)


def _check_relative(name: object, key: str, base: str) -> None:
    if not isinstance(name, str) or not name or "\\" in name:
        raise RecipeError(f"{key}: {name!r} must be a non-empty POSIX path relative to {base}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", ".") for part in pure.parts) or pure.as_posix() != name:
        raise RecipeError(
            f"{key}: {name!r} must be a normal relative path under {base} (no leading '/', no '.', '..' or empty "
            "segments)"
        )


# --- inputs ---------------------------------------------------------------------------------------


def check_inputs(cfg: EvalConfig, paths: StagePaths, root: Path) -> dict[str, CheckpointRef]:
    """The latest checkpoint of every stage in ``cfg.stages``, checked before anything is recorded.

    Refuses (naming the key and the fix): a listed stage without a ``paths.inputs`` role
    (:class:`RecipeError`); a checkpoint role the recipe does not list (it would be pinned as an input but
    not evaluated); a missing upstream manifest or a checkpoints directory without a complete checkpoint
    (:class:`CheckpointMissingError`: run that upstream stage); a window longer than a model's context.
    """
    for i, stage in enumerate(cfg.stages):
        if stage not in paths.inputs:
            raise RecipeError(
                f"eval.stages[{i}]: {stage!r} has no paths.inputs.{stage}; add "
                f"{{data: runs/{stage}/checkpoints, manifest: manifests/{stage}.json}}"
            )
    for role in paths.inputs:
        if role not in DATA_ROLES and role not in cfg.stages:
            raise RecipeError(
                f"paths.inputs.{role}: a checkpoint input that eval.stages does not list; list it in eval.stages "
                f"or drop the input (override ~paths.inputs.{role})"
            )
    for role, upstream in paths.inputs.items():
        if not (root / upstream.manifest).is_file():
            missing = CheckpointMissingError if role in cfg.stages else ArtifactMissingError
            raise missing(
                f"paths.inputs.{role}.manifest: {upstream.manifest} is missing; run the upstream stage first "
                f"(dvc repro {Path(upstream.manifest).stem})"
            )
    found: dict[str, CheckpointRef] = {}
    for stage in cfg.stages:
        directory = root / paths.inputs[stage].data
        ref = latest_checkpoint(directory)
        if ref is None:
            raise CheckpointMissingError(
                f"paths.inputs.{stage}.data: {paths.inputs[stage].data} holds no complete checkpoint; run the "
                f"upstream stage first (dvc repro {stage})"
            )
        context = read_model_config(directory).max_sequence_length
        if cfg.text.window > context:
            raise RecipeError(
                f"eval.text.window: {cfg.text.window} tokens is longer than the {stage} model's context "
                f"({context}); use a window of at most {context} so every checkpoint is measured alike"
            )
        found[stage] = ref
    return found


def preflight(root: Path) -> Callable[[EvalConfig, StagePaths], None]:
    """:func:`check_inputs` as :func:`flowpin.stage.stage_run`'s preflight (it runs before anything is recorded)."""

    def check(cfg: EvalConfig, paths: StagePaths) -> None:
        check_inputs(cfg, paths, root)

    return check


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutDoc:
    """One held-out text document."""

    path: str
    """Stdlib-relative POSIX path."""
    text: str
    sha256: str
    """sha256 of the file's bytes (what the ingest records carry)."""
    bytes: int
    """UTF-8 bytes (the denominator of bits-per-byte)."""


def read_heldout_text(stdlib_root: Path, files: Sequence[str]) -> list[HeldoutDoc]:
    """Read the held-out files (UTF-8) under ``stdlib_root``, in recipe order."""
    docs: list[HeldoutDoc] = []
    for j, rel in enumerate(files):
        path = stdlib_root / rel
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactMissingError(
                f"eval.text.files[{j}]: {rel} does not exist under the stdlib root {stdlib_root}; list another file"
            ) from exc
        except OSError as exc:
            raise DataError(f"eval.text.files[{j}]: cannot read {path}: {exc.strerror or exc}") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"eval.text.files[{j}]: {rel} is not UTF-8 ({exc.reason}); list another file") from exc
        if not raw:
            raise DataError(f"eval.text.files[{j}]: {rel} is empty; list a file with text in it")
        docs.append(HeldoutDoc(path=rel, text=text, sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw)))
    return docs


def check_heldout_disjoint(docs: Sequence[HeldoutDoc], ingest_dir: Path) -> int:
    """Refuse held-out text the corpus ingested; returns the number of ingest records checked.

    Every record of the ingest dataset carries ``source.sha256`` of its bytes and ``source.path``; a
    held-out file whose sha256 equals any record's, or whose path equals a standard-library record's path,
    raises :class:`HeldoutOverlapError` naming both.
    """
    by_sha = {d.sha256: d for d in docs}
    by_path = {d.path: d for d in docs}
    count = 0
    for rec in read_dataset(ingest_dir):
        count += 1
        source = rec.get("source")
        if not isinstance(source, dict):
            raise DataError(f"{ingest_dir}: record {rec.get('id')!r} has no 'source'; rerun the ingest stage")
        doc = by_sha.get(str(source.get("sha256")))
        origin = str(source.get("origin", ""))
        if doc is None and origin.startswith("python-stdlib"):
            doc = by_path.get(str(source.get("path")))
        if doc is not None:
            raise HeldoutOverlapError(
                f"eval.text.files: {doc.path} is ingest record {rec.get('id')!r} ({ingest_dir}): the models may "
                "have trained on it, so it is not held-out text; list a file the ingest recipe does not select"
            )
    return count


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decontamination:
    """The decontamination report, checked (:func:`load_decontamination`)."""

    raw: bytes
    """The report's bytes (copied unchanged into the output)."""
    summary: dict[str, Any]
    """What the table says about it (digest, n-gram rule, what each evaluation set removed)."""


def load_decontamination(
    report: Path,
    *,
    report_name: str,
    manifest: Path,
    synth_name: str,
    synth_digest: Mapping[str, str],
    root: Path | None = None,
) -> Decontamination:
    """Read the decontamination report and check it belongs to the evaluated data.

    * the decontaminate ``manifest`` must be signed by a key trusted in ``root`` (default: the project
      holding it), else :class:`~flowpin.errors.UnverifiedManifestError`;
    * ``report`` (artifact name ``report_name``) must have the digest the decontaminate ``manifest`` pins
      for it among its byproducts;
    * that stage's recipe must list a ``synth_heldout`` evaluation set (the training data was checked
      against the held-out tasks);
    * it must have read the synth dataset ``synth_name`` with ``synth_digest`` (``{algorithm: hex}``, flowpin's
      content identity), the
      one evaluated here.

    Each failure raises :class:`DecontaminationReportError` naming what to rerun.
    """
    from flowpin.hashing import hash_bytes
    from flowpin.manifest.digests import identity_value, pinned_identity
    from flowpin.manifest.trust import load_verified
    from flowpin.paths import find_root

    # the byproduct digest relied on is checked below; the manifest's other pins are decontaminate's own
    m = load_verified(
        manifest,
        root=root if root is not None else find_root(manifest.parent),
        check="signature",
        purpose="evaluate against its decontamination report",
    )
    try:
        raw = report.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactMissingError(
            f"eval.decontamination_report: {report_name} is missing; rerun decontaminate"
        ) from exc
    pinned = m.byproduct(report_name)
    if pinned is None or not pinned.get("digest"):
        raise DecontaminationReportError(
            f"eval.decontamination_report: {manifest.name} pins no byproduct {report_name}; name the report "
            "that stage wrote (its paths.report)"
        )
    algorithm, expected = pinned_identity(pinned)
    if hash_bytes(raw, algorithm) != expected:
        raise DecontaminationReportError(
            f"eval.decontamination_report: {report_name} is not the report {manifest.name} vouches for (its "
            f"{algorithm} differs); rerun decontaminate (dvc repro decontaminate)"
        )
    evals = (m.recipe.get("decontaminate") or {}).get("evals") or []
    heldout = [str(e.get("name")) for e in evals if isinstance(e, dict) and e.get("kind") == "synth_heldout"]
    if not heldout:
        raise DecontaminationReportError(
            f"{manifest.name}: the decontaminate recipe lists no synth_heldout evaluation set, so the training "
            "data was not checked against the held-out tasks; add one to decontaminate.evals and rerun"
        )
    read = next((d for d in m.dependencies if d.get("name") == synth_name), None)
    common = [alg for alg in synth_digest if read is not None and identity_value(read, alg) is not None]
    if read is None or not common or any(identity_value(read, alg) != synth_digest[alg] for alg in common):
        raise DecontaminationReportError(
            f"{manifest.name}: decontamination did not read the synth data evaluated here ({synth_name} "
            "differs or is absent); rerun decontaminate on it (dvc repro decontaminate)"
        )
    try:
        doc = json.loads(raw)
        summary = _decontamination_summary(doc, heldout)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DecontaminationReportError(
            f"eval.decontamination_report: {report_name} is not a decontaminate report ({exc}); rerun decontaminate"
        ) from exc
    summary = {"file": DECONTAMINATION_NAME, "source": report_name, algorithm: expected, **summary}
    return Decontamination(raw=raw, summary=summary)


def _decontamination_summary(doc: Mapping[str, Any], heldout: Sequence[str]) -> dict[str, Any]:
    items = {e["name"]: e["items"] for e in doc["evals"]}
    return {
        "ngram": {"n": doc["ngram"]["n"], "tokenizer": doc["ngram"]["tokenizer"]},
        "heldout_sets": list(heldout),
        "evals": [
            {
                "name": d["name"],
                "items": items.get(d["name"]),
                "documents_removed": d["documents_removed"],
                "eval_items_hit": d["eval_items_hit"],
            }
            for d in doc["detection"]
        ],
        "documents_in": doc["totals"]["documents_in"],
        "documents_out": doc["totals"]["documents_out"],
        "removed_ngram": doc["totals"]["removed_ngram"],
        "removed_expansion": doc["totals"]["removed_expansion"],
    }


# --- measurements (pure: a model and values in, values out) ----------------------------------------


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


def select_tasks(tasks: Sequence[Task], per_kind: int | None) -> list[Task]:
    """The first ``per_kind`` tasks of each kind, kinds in order of first appearance (all when ``None``)."""
    if per_kind is None:
        return list(tasks)
    taken: dict[str, int] = {}
    out: list[Task] = []
    for task in tasks:
        if taken.get(task.kind, 0) < per_kind:
            taken[task.kind] = taken.get(task.kind, 0) + 1
            out.append(task)
    return out


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


def pass_at_1(tasks: Sequence[Task], passed: Sequence[bool]) -> dict[str, Any]:
    """``{"by_kind": {kind: {n, passed, pass_at_1}}, "overall": {...}}`` (kinds in order of first appearance;
    overall is the micro-average: all passed / all tasks)."""
    if len(tasks) != len(passed):
        raise ValueError(f"{len(tasks)} tasks but {len(passed)} grades")

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


# --- the table --------------------------------------------------------------------------------------


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


# --- the stage ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalInputs:
    """Where the stage's inputs are (the stage script resolves them from ``paths.inputs``)."""

    checkpoints: Mapping[str, CheckpointRef]
    """Stage -> its latest checkpoint, in table order (:func:`check_inputs`)."""
    vocab: Vocab
    """The tokenizer the checkpoints were trained with (:func:`open_vocab`)."""
    synth_dir: Path
    ingest_dir: Path
    stdlib_root: Path
    stdlib_uri: str
    """How a verifier finds ``stdlib_root`` (``python-stdlib:3.11.7``), written into the table."""
    decontamination: Decontamination


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    table: dict[str, Any]
    report: dict[str, Any]


def run_eval(
    cfg: EvalConfig, inputs: EvalInputs, out_dir: Path, *, progress: Callable[[str], None] | None = None
) -> EvalResult:
    """Evaluate every checkpoint of ``inputs`` and write the table into ``out_dir`` (see the module docstring)."""
    determinism = set_deterministic(cfg.seed, cpu_threads=cfg.threads)
    vocab = inputs.vocab
    vocab_size = vocab.tokenizer.get_vocab_size()
    docs = read_heldout_text(inputs.stdlib_root, cfg.text.files)
    ingest_records = check_heldout_disjoint(docs, inputs.ingest_dir)
    doc_ids = [_encode_exactly(vocab, d) for d in docs]
    n_bytes = sum(d.bytes for d in docs)
    tasks = select_tasks(load_tasks(inputs.synth_dir / HELDOUT_SPLIT), cfg.tasks.per_kind)
    if not tasks:
        raise DataError(f"{inputs.synth_dir / HELDOUT_SPLIT}: no held-out tasks; rerun the synth stage")
    kinds = _kind_counts(tasks)
    for kind in kinds:  # every kind must have a verifier before any model runs
        verifier_for(kind)

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
            {
                "stage": stage,
                "checkpoint": {"name": ref.path.name, "step": ref.step, "state_sha256": state_digest(ref.path)},
                "context": model_cfg.max_sequence_length,
                "bits_per_byte": bpb.bits_per_byte,
                "nats_per_token": bpb.nats_per_token,
                "pass_at_1": scores,
                "responses_unstopped": sum(not a.stopped for a in answers),
            }
        )
        responses[stage] = [
            {"id": t.id, "response": a.text, "passed": ok} for t, a, ok in zip(tasks, answers, passed, strict=True)
        ]
        if progress is not None:
            o = scores["overall"]
            progress(f"{stage} {ref.path.name}: {bpb.bits_per_byte:.4f} bits/byte, pass@1 {o['passed']}/{o['n']}")

    table: dict[str, Any] = {
        "format": {"version": TABLE_VERSION},
        "text": {
            "source": inputs.stdlib_uri,
            "files": [
                {"path": d.path, "bytes": d.bytes, "sha256": d.sha256, "tokens": len(ids)}
                for d, ids in zip(docs, doc_ids, strict=True)
            ],
            "bytes": n_bytes,
            "tokens": sum(len(ids) for ids in doc_ids),
            "window": cfg.text.window,
            "windows": sum(len(token_windows(ids, window=cfg.text.window, context_id=vocab.eos_id)) for ids in doc_ids),
            "ingest_records_checked": ingest_records,
        },
        "tasks": {
            "split": HELDOUT_SPLIT,
            "per_kind": cfg.tasks.per_kind,
            "kinds": kinds,
            "ids": [t.id for t in tasks],
            "decoding": "greedy",
            "max_new_tokens": cfg.tasks.max_new_tokens,
            "verifier": {"function": GRADER, "by_kind": {k: KIND_VERIFIERS[k] for k in kinds}},
        },
        "decontamination": inputs.decontamination.summary,
        "rows": rows,
    }
    atomic_write_bytes(out_dir / TABLE_NAME, canonical_json(table) + b"\n")
    atomic_write_bytes(out_dir / MARKDOWN_NAME, render_markdown(table).encode("utf-8"))
    atomic_write_bytes(out_dir / RESPONSES_NAME, canonical_json(responses) + b"\n")
    atomic_write_bytes(out_dir / DECONTAMINATION_NAME, inputs.decontamination.raw)
    report = {
        "determinism": determinism,
        "text": {"bytes": n_bytes, "tokens": table["text"]["tokens"], "window": cfg.text.window},
        "tasks": len(tasks),
        "stages": {
            r["stage"]: {
                "step": r["checkpoint"]["step"],
                "bits_per_byte": r["bits_per_byte"],
                "pass_at_1": r["pass_at_1"]["overall"]["pass_at_1"],
                "pass_at_1_by_kind": {k: v["pass_at_1"] for k, v in r["pass_at_1"]["by_kind"].items()},
            }
            for r in rows
        },
    }
    return EvalResult(table=table, report=report)


def resolve_inputs(
    cfg: EvalConfig,
    paths: StagePaths,
    *,
    root: Path,
    stdlib_root: Path,
    stdlib_uri: str,
    synth_digest: Mapping[str, str],
) -> EvalInputs:
    """The stage's inputs from its ``paths.inputs`` roles: checkpoints (:func:`check_inputs`), tokenizer
    (:func:`open_vocab`) and the checked decontamination report (:func:`load_decontamination`, with the
    digest ``synth_digest`` the stage pinned for ``paths.inputs.synth.data``)."""
    decontamination = load_decontamination(
        root / cfg.decontamination_report,
        report_name=cfg.decontamination_report,
        manifest=root / paths.inputs["decontaminate"].manifest,
        synth_name=paths.inputs["synth"].data,
        synth_digest=synth_digest,
        root=root,
    )
    return EvalInputs(
        checkpoints=check_inputs(cfg, paths, root),
        vocab=open_vocab(root / paths.inputs["tokenizer"].data),
        synth_dir=root / paths.inputs["synth"].data,
        ingest_dir=root / paths.inputs["ingest"].data,
        stdlib_root=stdlib_root,
        stdlib_uri=stdlib_uri,
        decontamination=decontamination,
    )


def open_vocab(tokenizer_dir: Path) -> Vocab:
    """The tokenizer of a tokenized dataset (``paths.inputs.tokenizer``), checked against its index."""
    data = TokenizedDataset.open(tokenizer_dir)
    return Vocab(tokenizer=data.tokenizer(), eos_id=data.eos_id, pad_id=data.pad_id)


def _kind_counts(tasks: Sequence[Task]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.kind] = counts.get(task.kind, 0) + 1
    return counts


def _encode_exactly(vocab: Vocab, doc: HeldoutDoc) -> list[int]:
    """The token ids of ``doc``; refuses a tokenizer that does not give the text back (the NLL would be of
    another string than the bytes it is divided by)."""
    ids = list(vocab.tokenizer.encode(doc.text, add_special_tokens=False).ids)
    if vocab.tokenizer.decode(ids, skip_special_tokens=False) != doc.text:
        raise TokenizerError(
            f"eval.text.files: the tokenizer does not round-trip {doc.path}; bits per byte would not measure "
            "these bytes (use a byte-level tokenizer or another file)"
        )
    return ids
