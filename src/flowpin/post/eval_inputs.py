"""The eval stage's inputs, found and checked before any model runs.

What :func:`flowpin.post.eval.run_eval` measures on, resolved from the recipe (:mod:`flowpin.post.eval_config`)
and ``paths.inputs``:

* **Checkpoints** (:func:`check_inputs`): the latest complete checkpoint of every listed stage, each
  model's context long enough for the recipe's window.
* **Held-out text** (:func:`read_heldout_text`, :func:`check_heldout_disjoint`, :func:`encode_heldout`):
  standard-library files the reference corpus did not ingest, refused when their sha256 or path is among
  the ingest stage's source records, and when the tokenizer does not give their text back.
* **Held-out tasks** (:func:`heldout_tasks`, :func:`first_per_kind`): the first ``per_kind`` tasks of each
  kind of the synth held-out split, in held-out order.
* **Decontamination** (:func:`load_decontamination`): the report the signed decontaminate manifest vouches
  for, that checked the training data against the synth held-out set it evaluated here.
* **Tokenizer** (:func:`open_vocab`).

:func:`resolve_inputs` gathers them into :class:`EvalInputs`. The measurements are in
:mod:`flowpin.post.eval_metrics`, the written table in :mod:`flowpin.post.eval_report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowpin.data.shards import read_dataset
from flowpin.data.synth import Task, load_tasks
from flowpin.errors import (
    ArtifactMissingError,
    CheckpointMissingError,
    DataError,
    DecontaminationReportError,
    HeldoutOverlapError,
    RecipeError,
    StrictJSONError,
    TokenizerError,
)
from flowpin.hashing import hash_bytes
from flowpin.jsonio import loads_strict
from flowpin.manifest.digests import identity_value, pinned_identity
from flowpin.manifest.trust import load_verified
from flowpin.paths import find_root
from flowpin.post.eval_config import DATA_ROLES, EvalConfig
from flowpin.post.inputs import first_per_kind
from flowpin.post.prompts import Vocab, open_vocab
from flowpin.recipe import StagePaths
from flowpin.train.checkpoint import CheckpointRef, latest_checkpoint
from flowpin.train.run import read_model_config

HELDOUT_SPLIT = "heldout"
"""The synth split evaluated (``<paths.inputs.synth.data>/heldout``)."""


# --- checkpoints ----------------------------------------------------------------------------------


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


# --- held-out text --------------------------------------------------------------------------------


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


def encode_heldout(vocab: Vocab, doc: HeldoutDoc) -> list[int]:
    """The token ids of ``doc``; refuses a tokenizer that does not give the text back (the NLL would be of
    another string than the bytes it is divided by)."""
    ids = list(vocab.tokenizer.encode(doc.text, add_special_tokens=False).ids)
    if vocab.tokenizer.decode(ids, skip_special_tokens=False) != doc.text:
        raise TokenizerError(
            f"eval.text.files: the tokenizer does not round-trip {doc.path}; bits per byte would not measure "
            "these bytes (use a byte-level tokenizer or another file)"
        )
    return ids


# --- held-out tasks -------------------------------------------------------------------------------


def heldout_tasks(synth_dir: Path, per_kind: int | None) -> list[Task]:
    """The evaluated tasks: :func:`first_per_kind` of the synth dataset's held-out split; none is a
    :class:`DataError`."""
    tasks = first_per_kind(load_tasks(synth_dir / HELDOUT_SPLIT), per_kind)
    if not tasks:
        raise DataError(f"{synth_dir / HELDOUT_SPLIT}: no held-out tasks; rerun the synth stage")
    return tasks


# --- the decontamination report -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decontamination:
    """The decontamination report, checked (:func:`load_decontamination`)."""

    raw: bytes
    """The report's bytes (copied unchanged into the output)."""
    summary: dict[str, Any]
    """What the table says about it (source, digest, n-gram rule, what each evaluation set removed); the
    table adds the name of the copy it writes (:func:`flowpin.post.eval_report.eval_table`)."""


MAX_REPORT_BYTES = 64 * 1024 * 1024
"""Bound on the decontamination report read (strict JSON; the reference flow's is a few KiB)."""


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
      content identity), the one evaluated here.

    Each failure raises :class:`DecontaminationReportError` naming what to rerun.
    """
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
        doc = loads_strict(raw, where=report_name, max_bytes=MAX_REPORT_BYTES)
        summary = _decontamination_summary(doc, heldout)
    except (StrictJSONError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DecontaminationReportError(
            f"eval.decontamination_report: {report_name} is not a decontaminate report ({exc}); rerun decontaminate"
        ) from exc
    return Decontamination(raw=raw, summary={"source": report_name, algorithm: expected, **summary})


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


# --- all of them ----------------------------------------------------------------------------------


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
