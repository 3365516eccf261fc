"""The ``flowpin`` command line: parse the arguments, call the library, print what it returns.

Every command is listed in ``flowpin --help`` with its exit status (:data:`COMMANDS`, also each command's own
``--help``), followed by the ``FLOWPIN_*`` environment variables (:data:`flowpin.settings.VARIABLES`). Handlers do
no work of their own: the library answers (:mod:`flowpin.manifest`, :mod:`flowpin.replay`, :mod:`flowpin.signing`,
:mod:`flowpin.modelsign`, :mod:`flowpin.experiment`, :mod:`flowpin.batch_query`, :mod:`flowpin.sweep`...) and
renders its answer as text or JSON; a handler prints it and returns the exit status.

Exit status follows the one policy of :mod:`flowpin.errors` (:func:`~flowpin.errors.exit_code`): 0 success; 1 the
command answered "no" (a verification failed, outputs differ; each failure named); 2 a
:class:`~flowpin.errors.FlowpinError` stopped it before it could answer (``flowpin: <Error>: <message>`` on stderr,
no traceback); 3 ``diff`` only: every output identical, but the identity differs; 70 a flowpin bug (its
traceback on stderr); 130 interrupted; 141 (128 + SIGPIPE) whoever read stdout closed it early
(``flowpin show M | head``): the command stops quietly, whatever it was doing.

Human output escapes control and bidi characters in every string that comes from a manifest
(:func:`flowpin.display.safe`); ``--json`` output is JSON (which escapes them itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import textwrap
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flowpin import __version__, settings
from flowpin.display import safe, safe_lines
from flowpin.errors import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_OK, FlowpinError, InternalError, exit_code
from flowpin.paths import find_root

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
    """One command as ``flowpin --help`` lists it."""

    name: str
    """The words after ``flowpin`` (``key init``)."""
    summary: str
    """What it does, one line."""
    exits: str
    """Its exit status but 2 (and the statuses every command shares: 70 bug, 130 interrupted, 141 stdout closed)."""
    refused: str = "an input error"
    """What exits 2 (always an input error: a :class:`~flowpin.errors.FlowpinError`)."""

    @property
    def description(self) -> str:
        return f"{self.summary[0].upper()}{self.summary[1:]}. Exit status: {self.exits}; 2 {self.refused}."


COMMANDS: tuple[Command, ...] = (
    Command(name="key init", summary="create the Ed25519 key that signs manifests (0600) and trust it", exits="0 done"),
    Command(name="key list", summary="list the trusted keyids (keys/*.pub)", exits="0 listed"),
    Command(
        name="verify",
        summary="check schema, signature, trusted key and every digest of manifests",
        exits="0 every manifest verified, 1 some failed (each failing artifact named with the reason)",
    ),
    Command(
        name="diff",
        summary="semantic diff of two manifests or two manifest directories, verdict first",
        exits="0 every pair identical in identity, 1 some outputs differ (or a manifest is on one side only), "
        "3 every output identical but the identity differs (recipe, entry point, inputs, code or environment)",
    ),
    Command(
        name="lineage",
        summary="walk parent manifests back to raw inputs",
        exits="0 every parent found unchanged, 1 a parent is missing, changed or cyclic",
    ),
    Command(
        name="show",
        summary="human summary of a manifest (or its decoded statement)",
        exits="0 VERIFIED (signed by a trusted key), 1 UNVERIFIED (shown all the same, marked)",
        refused="the manifest cannot be read, or an input error",
    ),
    Command(
        name="batch",
        summary="which sequences, documents and text training step N saw, and on which data-parallel rank",
        exits="0 described",
    ),
    Command(
        name="plan",
        summary="per-GPU memory and per-step communication of a training recipe's layout on N GPUs",
        exits="0 the plan fits the GPUs' memory (less a 10% margin)",
        refused="the plan does not fit (PlanError: each part's GiB and what to change), or an input error",
    ),
    Command(
        name="fork",
        summary="continue a training stage from its checkpoint at a step, under overrides",
        exits="0 the fork trained and its manifest is recorded",
    ),
    Command(
        name="rebuild",
        summary="re-run stages in a scratch workspace from what their manifests pin and compare every output digest",
        exits="0 every stage reproduced bit for bit, 1 some output differs (the verdict names the files and the "
        "recorded differences that could explain it)",
        refused="a stage could not be rebuilt (missing or changed input, code drift, failing stage) or an input error",
    ),
    Command(
        name="sweep",
        summary="table of a Hydra sweep's jobs: the overrides that differ, status, final metrics",
        exits="0 every planned job ran and its manifest verifies, 1 some job failed, is missing, still running or "
        "does not verify",
        refused="not a sweep directory, or an input error",
    ),
    Command(
        name="exp",
        summary="run one stage as a DVC experiment under Hydra overrides (checked, then `dvc exp run -S`)",
        exits="0 the experiment ran (or, with --dry-run, was planned), 1 `dvc exp run` failed",
        refused="an override DVC could not apply as the command line means it, or an input error",
    ),
    Command(
        name="release export",
        summary="write the signed release directory another lab replays (docs/release.md)",
        exits="0 written",
        refused="the release is incoherent (uncommitted changes, `dvc status` not clean, a manifest that does not "
        "verify, an output missing from the DVC cache) or an input error",
    ),
    Command(
        name="release import",
        summary="in a clone of a release: check it against keys/ and every file, make its store the DVC remote",
        exits="0 imported (and pulled/verified when asked), 1 dvc pull or verify failed",
        refused="the release was refused (not a release, tampered, untrusted signature, wrong commit, missing "
        "object) or an input error",
    ),
    Command(
        name="model-sign key init",
        summary="create the EC P-256 model-signing key (0600) and trust it in keys/model-signing/",
        exits="0 done",
    ),
    Command(
        name="model-sign sign",
        summary="sign a checkpoint directory in the OpenSSF model-signing format (docs/model-signing.md)",
        exits="0 signed",
    ),
    Command(
        name="model-sign verify",
        summary="verify a checkpoint directory's OpenSSF model signature",
        exits="0 verified, 1 verification failed (the reason named)",
    ),
    Command(
        name="ui",
        summary="open the Aim UI of the project's runs (.aim) on 127.0.0.1 until Ctrl-C",
        exits="0 stopped by Ctrl-C or SIGTERM, 1 the UI server failed",
        refused="the UI cannot start (aim missing, repository unwritable), or an input error",
    ),
)
"""Every command, in ``flowpin --help``'s order."""

_BY_NAME = {c.name: c for c in COMMANDS}

COMMON_EXITS = (
    "Exit status, every command: 0 success; 1 the answer is no (a check failed, outputs differ: each named); "
    "2 input error (flowpin: <Error>: what, where and how to fix it); 3 diff only: outputs identical, identity "
    "differs; 70 a flowpin bug (its traceback shown); 130 interrupted; 141 stdout closed early."
)


def _top_help(width: int = 100) -> tuple[str, str]:
    """``flowpin --help``'s description (every command with its exit status) and epilog (the common exit
    statuses, the ``FLOWPIN_*`` variables), wrapped at ``width``."""
    column = max(len(c.name) for c in COMMANDS) + 4

    def wrap(text: str, first: str, indent: int) -> list[str]:
        return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=" " * indent, break_on_hyphens=False)

    def entry(head: str, text: str) -> list[str]:
        return wrap(text, f"  {head:<{column - 2}}", column)

    lines = ["Sign, verify, compare and replay the manifests of a DVC + Hydra flow.", "", "commands:"]
    for c in COMMANDS:
        lines += entry(c.name, c.summary)
        lines += wrap(f"exit {c.exits}; 2 {c.refused}", " " * (column + 2), column + 2)
    lines += ["", "`flowpin COMMAND --help` explains each argument of a command."]
    epilog = [*textwrap.wrap(COMMON_EXITS, width), "", "environment:"]
    column = max(len(name) for name in settings.VARIABLES) + 4
    for name, text in settings.VARIABLES.items():
        epilog += entry(name, text)
    return "\n".join(lines), "\n".join(epilog)


def _add(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> argparse.ArgumentParser:
    """The parser of command ``name`` (its last word under ``sub``), with the summary and exit status of
    :data:`COMMANDS`. A subcommand (``key init``) is listed in its group's help; a command (``verify``) is
    listed by ``flowpin --help``'s description, with its exit status."""
    c = _BY_NAME[name]
    word = name.rsplit(" ", 1)[-1]
    if " " in name:
        return sub.add_parser(word, help=c.summary, description=c.description)
    return sub.add_parser(word, description=c.description)


# --- key, model-sign -----------------------------------------------------------------------------------------


def _cmd_key_init(args: argparse.Namespace) -> int:
    from flowpin.signing import default_key_path, init_key, init_key_if_missing

    root = find_root()
    path = Path(args.path) if args.path else default_key_path(root)
    if args.if_missing:  # exactly one of concurrent callers creates the key; the others load it
        signer, created, added = init_key_if_missing(root, path)  # added: a key init killed before trusting it
        if not created:
            repaired = f"\ntrusted its public key keys/{signer.keyid}.pub" if added else ""
            print(f"signing key exists: {path}{repaired}")
            return EXIT_OK
    else:
        signer = init_key(root, key_path=path, force=args.force)
    print(f"created signing key {path} (mode 600)\nkeyid {signer.keyid}\ntrusted public key keys/{signer.keyid}.pub")
    return EXIT_OK


def _cmd_key_list(args: argparse.Namespace) -> int:
    from flowpin.signing import load_trust_store

    for keyid in sorted(load_trust_store(find_root())):
        print(keyid)
    return EXIT_OK


def _cmd_model_sign_key_init(args: argparse.Namespace) -> int:
    from flowpin.modelsign import default_key_path, init_key, init_key_if_missing

    root = find_root()
    path = default_key_path(root)
    if args.if_missing:  # exactly one of concurrent callers creates the key; the others load it
        info, created, added = init_key_if_missing(root, path)  # added: a key init killed before trusting it
        if not created:
            repaired = " (its public key was missing from the trust store: added)" if added else ""
            print(f"model-signing key exists: {path}\nkeyid {info.keyid}, trusted {info.public_path}{repaired}")
            return EXIT_OK
    else:
        info = init_key(root, key_path=path, force=args.force)
    print(
        f"created model-signing key {path} (EC P-256, mode 600)\nkeyid {info.keyid}\n"
        f"trusted public key {info.public_path.relative_to(root)}"
    )
    return EXIT_OK


def _cmd_model_sign_sign(args: argparse.Namespace) -> int:
    from flowpin.modelsign import sign_checkpoint

    signature = Path(args.signature) if args.signature else None
    t0 = time.perf_counter()
    signed = sign_checkpoint(Path(args.checkpoint), root=find_root(), signature=signature)
    print(
        f"signed {signed.checkpoint} ({len(signed.files)} files) with model-signing key {signed.keyid[:16]}… "
        f"in {time.perf_counter() - t0:.2f} s\nsignature {signed.signature}\n"
        f"check it with the OpenSSF tool alone:\n  {signed.openssf_command()}"
    )
    return EXIT_OK


def _cmd_model_sign_verify(args: argparse.Namespace) -> int:
    from flowpin.errors import IntegrityError, ModelSignatureError
    from flowpin.modelsign import verify_checkpoint

    signature = Path(args.signature) if args.signature else None
    try:
        signed = verify_checkpoint(Path(args.checkpoint), root=find_root(), signature=signature)
    except (ModelSignatureError, IntegrityError) as exc:  # the answer is "no", not an input error
        print(f"FAIL {args.checkpoint}\n     {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    print(f"OK   {signed.checkpoint} {len(signed.files)} files, signed by {signed.keyid[:16]}… ({signed.signature})")
    return EXIT_OK


# --- manifests: verify, diff, lineage, show ------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    from flowpin.hashing import DEFAULT_ALGORITHM, Hasher, default_cache, parallel_workers
    from flowpin.manifest.summary import render_verification, render_verify_totals
    from flowpin.manifest.verify import find_manifests, verify_manifest
    from flowpin.signing import load_trust_store

    root = find_root()
    paths = [Path(p) for p in args.paths] or (find_manifests(root) if args.all else [])
    if not paths:
        raise FlowpinError("nothing to verify: name manifest files or pass --all (verifies manifests/**/*.json)")
    trusted = load_trust_store(root, tuple(Path(d) for d in args.trust))
    cache = None if args.no_cache else default_cache(root)
    hasher = Hasher(root, DEFAULT_ALGORITHM, cache=cache, workers=parallel_workers())  # a command that only hashes
    failed = 0
    for path in paths:
        report = verify_manifest(path, root=root, trusted=trusted, hasher=hasher)
        failed += not report.ok
        print(render_verification(path, report))
    if cache is not None:
        cache.close()
    stats = hasher.stats
    print(
        render_verify_totals(
            verified=len(paths) - failed, failed=failed, hashed=stats.files, cache_hits=stats.cache_hits
        )
    )
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from flowpin.manifest.diff import diff_paths, render_json, render_text, verdict_of

    diffs = diff_paths(Path(args.a), Path(args.b), include_run=args.include_run, trusted=_trust_store())
    verdict = verdict_of(diffs, label_a=args.a, label_b=args.b)
    print(render_json(diffs, verdict) if args.json else render_text(diffs, verdict))
    return verdict.exit_code


def _cmd_lineage(args: argparse.Namespace) -> int:
    from flowpin.manifest.lineage import lineage, render_tree

    node = lineage(Path(args.path).resolve(), find_root())
    print(json.dumps(node.as_dict(), indent=2, sort_keys=True) if args.json else render_tree(node))
    problems = node.problems()
    for p in problems:
        print(f"problem: {safe(p)}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _trust_store() -> dict[str, Ed25519PublicKey]:
    """The project's trusted keys; none outside a project (then nothing verifies)."""
    from flowpin.errors import PathError
    from flowpin.signing import load_trust_store

    try:
        root = find_root()
    except PathError:
        return {}
    return load_trust_store(root)


def _cmd_show(args: argparse.Namespace) -> int:
    """0 when the manifest is VERIFIED (signed by a trusted key; with --digests also every digest), 1 when
    UNVERIFIED (it is shown all the same, marked), 2 when it cannot be read."""
    from flowpin.manifest.statement import load_manifest
    from flowpin.manifest.summary import render_summary, show_status

    m = load_manifest(Path(args.path))
    status = show_status(m, _trust_store(), digests=find_root() if args.digests else None)
    # --json: the statement as signed (JSON escapes control characters)
    print(json.dumps(m.statement, indent=2, sort_keys=True) if args.json else render_summary(m, status))
    if not status.verified:
        print(f"flowpin: {safe(status.text)}", file=sys.stderr)
    return EXIT_OK if status.verified else EXIT_FAILED


# --- training data and runs: batch, fork, rebuild, sweep, exp, ui --------------------------------------------


def _cmd_batch(args: argparse.Namespace) -> int:
    from flowpin.batch_query import BatchQuery, answer_batch_query, batch_json, render_batch

    query = BatchQuery(
        path=Path(args.path),
        step=args.step,
        rank=args.rank,
        world_size=args.world_size,
        order_seed=args.order_seed,
        batch_size=args.batch_size,
        data=None if args.data is None else Path(args.data),
    )
    answer = answer_batch_query(query, root=find_root())
    print(batch_json(answer) if args.json else render_batch(answer, width=args.width))
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    from flowpin.train.plan import check_fits, plan_recipe, render_plan

    recipe = Path(args.recipe)
    config_dir = recipe.parent if recipe.suffix == ".yaml" else find_root() / "params"
    name = recipe.stem if recipe.suffix == ".yaml" else args.recipe
    plan = plan_recipe(config_dir, name, args.overrides, gpus=args.gpus)
    print(render_plan(plan, args.gpu_memory))
    check_fits(plan, args.gpu_memory)  # PlanError: exit 2, with the numbers
    return EXIT_OK


def _memory_arg(value: str) -> int:
    from flowpin.train.plan import parse_memory

    try:
        return parse_memory(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cmd_fork(args: argparse.Namespace) -> int:
    from flowpin.replay.fork import fork

    root = find_root()
    manifest = fork(Path(args.manifest), step=args.step, overrides=list(args.overrides), root=root, out=args.out)
    print(f"fork recorded: {manifest.relative_to(root) if manifest.is_relative_to(root) else manifest}")
    return EXIT_OK


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from flowpin.hashing import parallel_workers
    from flowpin.replay.rebuild import (
        RebuildOptions,
        exit_status,
        flow_manifests,
        rebuild_many,
        render_json,
        render_result,
        render_totals,
    )

    root = find_root()
    paths = [Path(p) for p in args.paths] or (flow_manifests(root) if args.all else [])
    if not paths:
        raise FlowpinError("nothing to rebuild: name manifest files or pass --all (rebuilds manifests/*.json)")
    options = RebuildOptions(
        workdir=Path(args.workdir) if args.workdir else None,
        keep=args.keep,
        allow_code_drift=args.allow_code_drift,
        hash_workers=parallel_workers(),  # a command that only hashes here: every core (flowpin.hashing.pool)
    )
    results = []
    t0 = time.monotonic()
    for result in rebuild_many(paths, root=root, options=options, stages=args.stage):
        results.append(result)
        if not args.json:
            print(render_result(result), flush=True)
    print(render_json(results) if args.json else render_totals(results, time.monotonic() - t0))
    return exit_status(results)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from flowpin.hashing import parallel_workers
    from flowpin.sweep import manifest_verifier, read_sweep, render_sweep

    with manifest_verifier(find_root(), hash_workers=parallel_workers()) as verify:
        table = read_sweep(Path(args.sweep_dir), verify=verify, metrics=args.metric or None)
    print(json.dumps(table.as_dict(), indent=2, sort_keys=True) if args.json else render_sweep(table))
    return EXIT_OK if table.ok else EXIT_FAILED


def _cmd_exp(args: argparse.Namespace) -> int:
    from flowpin.experiment import plan_experiment, run_experiment

    root = find_root()
    plan = plan_experiment(args.stage, args.overrides, root=root)
    argv = plan.argv(name=args.name, temp=args.temp, queue=args.queue)
    print(shlex.join(argv), flush=True)
    if args.dry_run:
        return EXIT_OK
    status = run_experiment(argv, root=root)
    if status != 0:
        print(f"flowpin: {argv[0]} {argv[1]} {argv[2]} failed (exit {status})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_ui(args: argparse.Namespace) -> int:
    from flowpin.tracking.aim_server import serve_ui

    return serve_ui(Path(args.repo) if args.repo else find_root(), port=args.port)


# --- release --------------------------------------------------------------------------------------------------


def _cmd_release_export(args: argparse.Namespace) -> int:
    from flowpin.hashing import parallel_workers
    from flowpin.replay.release import export_release, render_export

    root = find_root()
    print(render_export(export_release(root, Path(args.dir), force=args.force, hash_workers=parallel_workers())))
    return EXIT_OK


def _keyid_arg(value: str) -> str:
    from flowpin.replay.release import check_keyid_prefix

    try:
        return check_keyid_prefix(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cmd_release_import(args: argparse.Namespace) -> int:
    from flowpin.replay.release import import_release, pull_release, render_import

    root = find_root()
    r = import_release(root, Path(args.dir), expect_keyid=args.expect_keyid)
    print(render_import(r, expected_key=args.expect_keyid is not None))
    if args.pull:
        status = pull_release(root, r)
        if status != 0:
            print(f"flowpin: {' '.join(r.pull)} failed (exit {status})", file=sys.stderr)
            return EXIT_FAILED
    if args.verify:
        return _cmd_verify(argparse.Namespace(paths=[], all=True, trust=[], no_cache=True))  # cache: no evidence
    if not args.pull:
        print(f"next: {' '.join(r.pull)} && flowpin verify --all")
    return EXIT_OK


# --- the parser ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    description, epilog = _top_help()
    p = argparse.ArgumentParser(
        prog="flowpin",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"flowpin {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands above")

    key = sub.add_parser("key", description="The key that signs manifests, and the trust store.")
    ksub = key.add_subparsers(dest="key_command", required=True)
    ki = _add(ksub, "key init")
    ki.add_argument("--path", help="where to write the private key (default .flowpin/keys/signing.key)")
    ki.add_argument("--force", action="store_true", help="replace an existing key")
    ki.add_argument("--if-missing", action="store_true", help="do nothing when a key already exists")
    ki.set_defaults(func=_cmd_key_init)
    _add(ksub, "key list").set_defaults(func=_cmd_key_list)

    v = _add(sub, "verify")
    v.add_argument("paths", nargs="*", help="manifest files")
    v.add_argument("--all", action="store_true", help="verify every manifest under manifests/")
    v.add_argument("--trust", action="append", default=[], metavar="DIR", help="extra directory of trusted *.pub")
    v.add_argument("--no-cache", action="store_true", help="re-read every file (ignore the stat cache)")
    v.set_defaults(func=_cmd_verify)

    d = _add(sub, "diff")
    d.description = (
        f"{d.description} Prints the verdict first (outputs identical in K of N; outputs identical but identity "
        "differs in M: which pairs, in which sections; outputs differ in J: which pairs; manifests on one side "
        "only; UNVERIFIED manifests), then one block per pair. Every manifest's signature is checked against "
        "keys/ and marked VERIFIED or UNVERIFIED (run metadata is compared too with --include-run)."
    )
    d.add_argument(
        "a", metavar="A", help="a manifest file, or a directory of manifests (paired with B's by relative path)"
    )
    d.add_argument("b", metavar="B", help="the manifest file or directory to compare A with")
    d.add_argument("--json", action="store_true", help='{"verdict": {...}, "diffs": [one object per pair]}')
    d.add_argument("--include-run", action="store_true", help="also compare run metadata (times, host)")
    d.set_defaults(func=_cmd_diff)

    lin = _add(sub, "lineage")
    lin.add_argument("path", help="the manifest to start from (e.g. manifests/eval.json)")
    lin.add_argument("--json", action="store_true", help="the tree as JSON")
    lin.set_defaults(func=_cmd_lineage)

    s = _add(sub, "show")
    s.add_argument("path", help="a manifest file (e.g. manifests/pretrain.json)")
    s.add_argument("--json", action="store_true", help="print the decoded statement")
    s.add_argument(
        "--digests", action="store_true", help="also re-hash every subject and dependency (as flowpin verify)"
    )
    s.set_defaults(func=_cmd_show)

    b = _add(sub, "batch")
    b.description = (
        f"{b.description} PATH is a training manifest (manifests/pretrain.json, midtrain.json, longctx.json, a "
        "fork's manifest.json) or one of its checkpoint directories: the run fixes the order (train.order_seed, "
        "train.loop.batch_size) and --step is the training step. Or PATH is a tokenize manifest, a tokenize recipe "
        "or a tokenized dataset directory: then --order-seed and --batch-size are required and --step is the "
        "order's 0-based step."
    )
    b.add_argument(
        "path",
        help="training manifest, checkpoint directory (step-NNNNNN), tokenize manifest or recipe, or tokenized "
        "dataset directory",
    )
    b.add_argument(
        "--step",
        type=int,
        required=True,
        help="training step N, 1-based: the N-th optimizer step, as metrics and checkpoint names count (step-000050 "
        "holds the state after step 50); for a dataset target, the order's 0-based step (epochs wrap)",
    )
    b.add_argument("--rank", type=int, help="show only the rows this data-parallel rank trained on")
    b.add_argument(
        "--world-size",
        type=int,
        help="data-parallel ranks sharing the batch (default: what the run's checkpoint records; 1 for a dataset)",
    )
    b.add_argument(
        "--order-seed", type=int, help="order seed; required for a dataset target, refused for a training run"
    )
    b.add_argument(
        "--batch-size",
        type=int,
        help="sequences per step, >= 1; required for a dataset target, refused for a training run; at most "
        "16,777,216 tokens (batch size x seq_len) are described at once",
    )
    b.add_argument(
        "--data",
        metavar="DIR",
        help="the tokenized dataset a checkpoint directory was trained on, when no signed manifest names it",
    )
    b.add_argument("--width", type=int, default=160, help="characters of text shown per sample (text mode)")
    b.add_argument("--json", action="store_true", help="full samples (untruncated text, rank of each) as JSON")
    b.set_defaults(func=_cmd_batch)

    pl = _add(sub, "plan")
    pl.description = (
        f"{pl.description} Composes params/RECIPE.yaml with the overrides (a recipe with a model group and a "
        "train block: train.layout, train.data_parallel, train.loop.batch_size) and plans megatron-core's mixed "
        "precision on N GPUs: weights, fp32 main weights, grad buffer, Adam state, activations (Korthikanti et "
        "al. 2022, with the layout's recompute) and logits per GPU, and the bytes each GPU sends per step. The "
        "training engine trains only the default layout until issue 16 lands. See docs/parallel.md."
    )
    pl.add_argument("recipe", help="a recipe name in params/ (pretrain_olmo3_7b) or a path to one (.yaml)")
    pl.add_argument("--gpus", type=int, default=8, help="GPUs of the launch (default 8: one node)")
    pl.add_argument(
        "--gpu-memory",
        type=_memory_arg,
        default=80 * 2**30,
        metavar="SIZE",
        help="memory of each GPU: 80GiB (default), 80GB, 141GB (GB = 10^9 bytes, GiB = 2^30)",
    )
    pl.add_argument("overrides", nargs="*", help="Hydra overrides (e.g. train.layout.tensor=2)")
    pl.set_defaults(func=_cmd_plan)

    f = _add(sub, "fork")
    f.add_argument("manifest", help="the training stage's manifest (e.g. manifests/pretrain.json)")
    f.add_argument("--step", type=int, required=True, help="the checkpoint step to continue from")
    f.add_argument("--out", help="run directory for the fork (default runs/forks/<stage>-step<N>-<hash>)")
    f.add_argument("overrides", nargs="*", help="Hydra overrides for the new branch (e.g. train.loop.steps=300)")
    f.set_defaults(func=_cmd_fork)

    rb = _add(sub, "rebuild")
    rb.add_argument("paths", nargs="*", help="manifest files")
    rb.add_argument("--all", action="store_true", help="every stage manifest of the flow (manifests/*.json)")
    rb.add_argument("--stage", action="append", default=[], metavar="NAME", help="only this stage (repeatable)")
    rb.add_argument("--workdir", help="build here and keep it (one subdirectory per stage for several manifests)")
    rb.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    rb.add_argument(
        "--allow-code-drift",
        action="store_true",
        help="use the checkout's code/config where the pinned bytes are in neither the checkout nor git history",
    )
    rb.add_argument("--json", action="store_true", help="results as JSON")
    rb.set_defaults(func=_cmd_rebuild)

    sw = _add(sub, "sweep")
    sw.add_argument("sweep_dir", help="the sweep directory a `-m` run writes (multirun/<date>/<time>-<id>)")
    sw.add_argument(
        "--metric", action="append", default=[], metavar="KEY", help="report key to show (dotted, repeatable)"
    )
    sw.add_argument("--json", action="store_true", help="the table as JSON")
    sw.set_defaults(func=_cmd_sweep)

    ex = _add(sub, "exp")
    ex.description = (
        f"{ex.description} Each override, as the stage script takes it, becomes a `-S params/<stage>.yaml:...` "
        "value DVC applies to the stage's primary config; checked first (the edited file must compose to the "
        "recipe the overrides give on the command line). See docs/experiments.md."
    )
    ex.add_argument("stage", help="a stage of dvc.yaml whose recipe is params/<stage>.yaml")
    ex.add_argument("overrides", nargs="*", help="Hydra overrides, as for the stage script (e.g. train.loop.steps=20)")
    ex.add_argument("--name", "-n", help="experiment name")
    mode = ex.add_mutually_exclusive_group()
    mode.add_argument("--temp", action="store_true", help="run in a temporary copy of the repository")
    mode.add_argument("--queue", action="store_true", help="queue it (sweeps: one experiment per combination)")
    ex.add_argument("--dry-run", action="store_true", help="print the dvc command line, run nothing")
    ex.set_defaults(func=_cmd_exp)

    rel = sub.add_parser("release", description="Export the release to a directory another lab replays, or import one.")
    rsub = rel.add_subparsers(dest="release_command", required=True)
    rx = _add(rsub, "release export")
    rx.add_argument("dir", help="a new (or empty) directory outside the repository")
    rx.add_argument("--force", action="store_true", help="replace a non-empty DIR whole")
    rx.set_defaults(func=_cmd_release_export)
    ri = _add(rsub, "release import")
    ri.add_argument("dir", help="the directory `flowpin release export` wrote")
    ri.add_argument("--pull", action="store_true", help="then run `dvc pull` from the release's store")
    ri.add_argument("--verify", action="store_true", help="then run `flowpin verify --all`")
    ri.add_argument(
        "--expect-keyid",
        metavar="HEX",
        type=_keyid_arg,
        help="refuse unless release.json is signed by this key (16-64 hex digits, as the exporting lab "
        "published it): anchors trust when the clone itself came from the release's bundle",
    )
    ri.set_defaults(func=_cmd_release_import)

    ms = sub.add_parser(
        "model-sign", description="Sign and verify checkpoints in the OpenSSF model-signing format (EC P-256)."
    )
    mssub = ms.add_subparsers(dest="model_sign_command", required=True)
    mkey = mssub.add_parser(
        "key", help="the EC P-256 key that signs checkpoints: init", description="The key that signs checkpoints."
    )
    mksub = mkey.add_subparsers(dest="model_key_command", required=True)
    mki = _add(mksub, "model-sign key init")
    mki.add_argument("--if-missing", action="store_true", help="do nothing when the key already exists")
    mki.add_argument("--force", action="store_true", help="replace an existing key")
    mki.set_defaults(func=_cmd_model_sign_key_init)
    for name, func, verb in (("sign", _cmd_model_sign_sign, "write"), ("verify", _cmd_model_sign_verify, "read")):
        msc = _add(mssub, f"model-sign {name}")
        msc.add_argument("checkpoint", help="checkpoint directory, e.g. runs/pretrain/checkpoints/step-000100")
        msc.add_argument(
            "--signature",
            help=f"bundle to {verb} (default <run>/model-signatures/step-NNNNNN.sig for a checkpoint in "
            "checkpoints/, else <checkpoint>.sig)",
        )
        msc.set_defaults(func=func)

    ui = _add(sub, "ui")
    ui.add_argument("--port", type=int, default=43800, help="port on 127.0.0.1 (0: a free one; default 43800)")
    ui.add_argument("--repo", help="directory holding the .aim repository (default: the project root)")
    ui.set_defaults(func=_cmd_ui)
    return p


_TAKES_OVERRIDES = ("fork", "exp", "plan")
"""Commands whose trailing Hydra overrides (``key=value``) may follow their options."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `flowpin fork M --step N a=b c=d`: argparse cannot take positionals after an option, so Hydra
    # overrides (key=value) left over go to the command; anything else is still an error.
    if extra and args.command in _TAKES_OVERRIDES and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _run(args.func, args)


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one handler under the exit-status policy (:func:`flowpin.errors.exit_code`)."""
    from flowpin.hashing import reporting_progress
    from flowpin.progress import hash_progress

    try:
        try:
            with hash_progress() as bar, reporting_progress(bar):  # long hashing (verify, rebuild…): a bar on a TTY
                status = int(func(args))
            sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is caught below
            return status
        except InternalError as exc:
            return _bug(exc)
        except FlowpinError as exc:
            print(f"flowpin: {type(exc).__name__}: {safe_lines(exc)}", file=sys.stderr)
            return exit_code(exc)
        except KeyboardInterrupt as exc:
            print("flowpin: interrupted", file=sys.stderr)
            return exit_code(exc)
        except BrokenPipeError:
            raise
        except Exception as exc:  # not raised on purpose: a flowpin bug
            return _bug(exc)
    except BrokenPipeError:
        return _stdout_closed()


def _bug(exc: Exception) -> int:
    """An internal error or an exception flowpin did not raise on purpose: its traceback, then status 70."""
    traceback.print_exc()
    print(
        f"flowpin: {type(exc).__name__}: {safe_lines(exc)}; a flowpin bug: report it with the traceback above",
        file=sys.stderr,
    )
    return exit_code(exc)


def _stdout_closed() -> int:
    """The reader of stdout went away (``flowpin show M | head``): stop quietly with status 141 (128 + SIGPIPE,
    what a shell reports for a command killed by SIGPIPE). stdout is pointed at /dev/null so that Python's
    final flush of what is still buffered cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no real file (captured in tests): nothing to redirect
        pass
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
