"""The ``flowpin`` command line: key, verify, diff, lineage, show, batch, fork, rebuild, model-sign.

Exit status: 0 success; 1 a verification failed / outputs differ (``diff``, ``rebuild``) / ``show`` of a
manifest that is not signed by a trusted key (UNVERIFIED); 2 usage or input error (a :class:`FlowpinError`
that prevents the command from giving an answer); 3 ``diff`` only: every output identical, but the identity
differs (recipe, entry point, inputs, code, environment); 141 (128 + SIGPIPE) when whoever reads stdout closed it early
(``flowpin show M | head``): the command stops quietly, without a traceback, whatever it was doing.

Human output escapes control and bidi characters in every string that comes from a manifest
(:func:`flowpin.display.safe`); ``--json`` output is JSON (which escapes them itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from flowpin import __version__
from flowpin.display import safe, safe_lines
from flowpin.errors import FlowpinError
from flowpin.hashing import DEFAULT_ALGORITHM, Hasher, default_cache
from flowpin.paths import find_root

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def _cmd_key_init(args: argparse.Namespace) -> int:
    from flowpin.signing import default_key_path, init_key, init_key_if_missing

    root = find_root()
    path = Path(args.path) if args.path else default_key_path(root)
    if args.if_missing:  # exactly one of concurrent callers creates the key; the others load it
        signer, created, added = init_key_if_missing(root, path)  # added: a key init killed before trusting it
        if not created:
            repaired = f"\ntrusted its public key keys/{signer.keyid}.pub" if added else ""
            print(f"signing key exists: {path}{repaired}")
            return 0
    else:
        signer = init_key(root, key_path=path, force=args.force)
    print(f"created signing key {path} (mode 600)\nkeyid {signer.keyid}\ntrusted public key keys/{signer.keyid}.pub")
    return 0


def _cmd_key_list(args: argparse.Namespace) -> int:
    from flowpin.signing import load_trust_store

    for keyid in sorted(load_trust_store(find_root())):
        print(keyid)
    return 0


def _cmd_model_sign_key_init(args: argparse.Namespace) -> int:
    from flowpin.modelsign import default_key_path, init_key, init_key_if_missing

    root = find_root()
    path = default_key_path(root)
    if args.if_missing:  # exactly one of concurrent callers creates the key; the others load it
        info, created, added = init_key_if_missing(root, path)  # added: a key-init killed before trusting it
        if not created:
            repaired = " (its public key was missing from the trust store: added)" if added else ""
            print(f"model-signing key exists: {path}\nkeyid {info.keyid}, trusted {info.public_path}{repaired}")
            return 0
    else:
        info = init_key(root, key_path=path, force=args.force)
    print(
        f"created model-signing key {path} (EC P-256, mode 600)\nkeyid {info.keyid}\n"
        f"trusted public key {info.public_path.relative_to(root)}"
    )
    return 0


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
    return 0


def _cmd_model_sign_verify(args: argparse.Namespace) -> int:
    from flowpin.errors import IntegrityError, ModelSignatureError
    from flowpin.modelsign import verify_checkpoint

    signature = Path(args.signature) if args.signature else None
    try:
        signed = verify_checkpoint(Path(args.checkpoint), root=find_root(), signature=signature)
    except (ModelSignatureError, IntegrityError) as exc:
        print(f"FAIL {args.checkpoint}\n     {type(exc).__name__}: {exc}")
        return 1
    print(f"OK   {signed.checkpoint} {len(signed.files)} files, signed by {signed.keyid[:16]}… ({signed.signature})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from flowpin.manifest.verify import find_manifests, verify_manifest
    from flowpin.signing import load_trust_store

    root = find_root()
    paths = [Path(p) for p in args.paths] or (find_manifests(root) if args.all else [])
    if not paths:
        raise FlowpinError("nothing to verify: name manifest files or pass --all (verifies manifests/**/*.json)")
    extra = tuple(Path(d) for d in args.trust)
    trusted = load_trust_store(root, extra)
    cache = None if args.no_cache else default_cache(root)
    hasher = Hasher(root, DEFAULT_ALGORITHM, cache=cache)
    failed = 0
    for path in paths:
        report = verify_manifest(path, root=root, trusted=trusted, hasher=hasher)
        if report.ok:
            signer = (report.keyid or "?")[:16]
            print(safe(f"OK   {path} [{report.stage}] {report.checked} artifacts, signed by {signer}…"))
        else:
            failed += 1
            print(safe(f"FAIL {path} [{report.stage or '?'}]"))
            for finding in report.findings:
                print(f"     {safe(finding)}")
    if cache is not None:
        cache.close()
    print(
        f"{len(paths) - failed} verified, {failed} failed "
        f"({hasher.stats.files} files hashed, {hasher.stats.cache_hits} from the stat cache)"
    )
    return 1 if failed else 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from flowpin.manifest.diff import diff_paths, render_text, verdict_of

    diffs = diff_paths(Path(args.a), Path(args.b), include_run=args.include_run, trusted=_trust_store())
    verdict = verdict_of(diffs, label_a=args.a, label_b=args.b)
    if args.json:
        doc = {"verdict": verdict.as_dict(), "diffs": [d.as_dict() for d in diffs]}
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        print(render_text(diffs, verdict))
    return verdict.exit_code


def _cmd_lineage(args: argparse.Namespace) -> int:
    from flowpin.manifest.lineage import lineage, render_tree

    root = find_root()
    node = lineage(Path(args.path).resolve(), root)
    if args.json:
        print(json.dumps(node.as_dict(), indent=2, sort_keys=True))
    else:
        print(render_tree(node))
    problems = node.problems()
    for p in problems:
        print(f"problem: {safe(p)}", file=sys.stderr)
    return 1 if problems else 0


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
    """Exit 0 when the manifest is VERIFIED (signed by a trusted key; with --digests also every digest), 1
    when UNVERIFIED (it is shown all the same, marked), 2 when it cannot be read. Every line is escaped."""
    from flowpin.errors import UnverifiedManifestError
    from flowpin.manifest.statement import entry_files, entry_kind, entry_size, load_manifest
    from flowpin.manifest.trust import check_signature, require_digests, short_digest

    m = load_manifest(Path(args.path))
    try:
        keyid = check_signature(m, _trust_store(), purpose="show it as signed")
        if args.digests:
            require_digests(m, None, root=find_root(), purpose="show it as verified")
        scope = "every digest re-hashed" if args.digests else "digests not re-hashed: add --digests"
        status = f"VERIFIED (signed by {keyid[:16]}…, trusted in keys/; {scope})"
    except UnverifiedManifestError as exc:
        status, keyid = f"UNVERIFIED: {exc}", ""
    if args.json:  # the statement as signed (JSON escapes control characters); the verdict on stderr
        print(json.dumps(m.statement, indent=2, sort_keys=True))
        if not keyid:
            print(f"flowpin: {safe(status)}", file=sys.stderr)
        return 0 if keyid else 1

    def out(line: str) -> None:
        print(safe(line))

    env, git, meta = m.environment, m.git, m.metadata
    out(f"manifest   {m.path}")
    out(f"stage      {m.stage}")
    out(f"identity   sha256:{m.identity_digest()}")
    out(f"signature  {status}")
    out(f"run        {meta['invocationId']}  {meta['startedOn']} → {meta['finishedOn']}")
    tracking = m.note("tracking")
    if tracking is not None:  # the Aim run of this stage run (open it with `flowpin ui`)
        from flowpin.tracking.aim import describe_note

        out(f"tracking   {describe_note(tracking)}")
    dirty = f" + uncommitted changes {git.get('dirtyDigest')}" if git.get("dirty") else ""
    out(f"code       git {git.get('commit') or '(none)'}{dirty}")
    torch = env.get("torch") or {}
    out(
        f"env        python {env.get('python', {}).get('version')}, torch {torch.get('version')}, "
        f"threads {torch.get('numThreads')}, deterministic {torch.get('deterministicAlgorithms')}"
    )
    entry = m.entry_point
    rerun = shlex.join(entry.command([])) if entry else "(not recorded: re-run the stage to record it)"
    out(f"entry      {rerun}")
    overrides = m.overrides
    out(f"overrides  {' '.join(overrides) if overrides else '(none)'}")
    out("outputs")
    for s in m.subjects:
        n = len(entry_files(s))
        out(f"  {s['name']}  {short_digest(s)}  {entry_size(s)} B" + (f", {n} files" if n else ""))
    out("inputs")
    for d in m.dependencies:
        uri = f"  ({d['uri']})" if "uri" in d else ""
        out(f"  [{entry_kind(d)}] {d['name']}  {short_digest(d)}{uri}")
    for bp in m.byproducts:
        if "digest" in bp:
            out(f"byproduct  {bp['name']}  {short_digest(bp)}")
        else:
            out(f"byproduct  {bp['name']}  {json.dumps(bp.get('annotations', {}), sort_keys=True)[:100]}")
    if not keyid:
        print(f"flowpin: {safe(status)}", file=sys.stderr)
    return 0 if keyid else 1


def _cmd_ui(args: argparse.Namespace) -> int:
    from flowpin.tracking.aim import serve_ui

    return serve_ui(Path(args.repo) if args.repo else find_root(), port=args.port)


def _cmd_batch(args: argparse.Namespace) -> int:
    from flowpin.data.order import (
        MAX_DESCRIBED_TOKENS,
        BatchTarget,
        check_batch_request,
        describe_samples,
        order_digest,
        order_for,
    )
    from flowpin.data.tokenize import TokenizedDataset
    from flowpin.errors import DataOrderError
    from flowpin.train.step_batch import resolve_target, sample_ranks, step_data

    # Bounds before anything is read (the training step's lower bound, 1, once the target is known).
    check_batch_request(
        step=args.step, batch_size=1 if args.batch_size is None else args.batch_size, names=("--step", "--batch-size")
    )
    for flag, value, minimum in (("--rank", args.rank, 0), ("--world-size", args.world_size, 1)):
        if value is not None and value < minimum:
            raise DataOrderError(f"{flag}: {value} must be >= {minimum}; pass a value of {minimum} or more")
    root = find_root()
    target = resolve_target(Path(args.path), root, data=None if args.data is None else Path(args.data))
    if isinstance(target, BatchTarget):
        missing = [f for f, v in (("--order-seed", args.order_seed), ("--batch-size", args.batch_size)) if v is None]
        if missing:
            raise DataOrderError(
                f"{safe(args.path)}: a tokenized dataset has no data order of its own (the training recipe owns it: "
                f"train.order_seed, train.loop.batch_size); pass {' and '.join(missing)}, or name a training "
                "manifest (flowpin batch manifests/pretrain.json --step N) to see what a training step saw"
            )
        if args.data is not None:
            raise DataOrderError("--data: only for a checkpoint directory; leave it out")
        dataset, seed, size, position = target, args.order_seed, args.batch_size, args.step
        world = 1 if args.world_size is None else args.world_size
        world_from = "--world-size" if args.world_size is not None else "default: one process"
        head: dict[str, object] = {"kind": "dataset", "stage": None, "step_counting": "order step, 0-based"}
        trust = (
            f"VERIFIED: {args.path} is signed by a trusted key; {target.name} is checked against the digest it pins"
            if target.pinned is not None
            else f"UNPINNED: {target.name} is read as it is (no signed manifest named)"
        )
        where = None
    else:
        if args.data is not None and target.kind != "checkpoint":
            raise DataOrderError(
                f"--data: {safe(target.source)} names its dataset; --data is for a checkpoint directory"
            )
        for flag, value in (("--order-seed", args.order_seed), ("--batch-size", args.batch_size)):
            if value is not None:
                raise DataOrderError(
                    f"{flag}: {safe(target.source)} fixes the order (train.order_seed {target.order_seed}, "
                    f"train.loop.batch_size {target.batch_size}); leave it out, or name the tokenized dataset "
                    f"({safe(target.dataset.name)}) to see another order"
                )
        where = step_data(target, args.step, world_size=args.world_size)
        dataset, seed, size, position = target.dataset, target.order_seed, target.batch_size, where.position
        world, world_from, trust = where.world_size, where.world_size_from, target.trust
        head = {
            "kind": target.kind,
            "stage": target.stage,
            "step_counting": "training step, 1-based (the N-th optimizer step)",
            "offset": where.offset,
            "first_step": where.first_step,
            "last_step": target.steps,
            "checkpoint": where.checkpoint,
        }
    ranks = sample_ranks(size, world, world_from)
    rows = None
    if args.rank is not None:
        if args.rank >= world:
            raise DataOrderError(
                f"--rank {args.rank}: the run has {world} data-parallel rank(s), 0..{world - 1} ({world_from}); "
                "pass a rank in that range (or --world-size W to see how W ranks split the batch)"
            )
        rows = slice(ranks.index(args.rank), len(ranks) - ranks[::-1].index(args.rank))
    data = TokenizedDataset.open(dataset.data_dir)
    described = size if rows is None else rows.stop - rows.start
    if where is not None and described * data.seq_len > MAX_DESCRIBED_TOKENS:
        raise DataOrderError(
            f"step {args.step}: {described} sequences x {data.seq_len} tokens is more than the {MAX_DESCRIBED_TOKENS} "
            "tokens one batch description may hold; describe it in parts: --rank R (with --world-size W)"
        )
    names = ("--step", "--batch-size")
    check_batch_request(step=position, batch_size=described, seq_len=data.seq_len, names=names)  # before hashing
    order = order_for(
        data,
        order_seed=seed,
        batch_size=size,
        dataset_digest=order_digest(dataset) if where is None else where.dataset_digest,
    )
    samples = describe_samples(data, order, position, rows=rows)
    first = position * size
    head = {
        "target": str(args.path),
        **head,
        "trust": trust,
        "dataset": dataset.name,
        "dataset_digest": order.dataset_digest,
        "n_sequences": data.n_sequences,
        "seq_len": data.seq_len,
        "order_seed": seed,
        "batch_size": size,
        "step": args.step,
        "position": position,
        "epoch": order.epoch(position),
        "world_size": world,
        "world_size_from": world_from,
        "rank": args.rank,
    }
    if args.json:
        shown = [{**s.to_json(), "rank": ranks[s.position]} for s in samples]
        print(json.dumps({**head, "samples": shown}, indent=2, sort_keys=True))
        return 0
    lines = []
    if where is not None:
        lines.append(f"run      {args.path} [{head['stage'] or 'no signed manifest names its stage'}]")
    lines += [
        f"trust    {trust}",
        f"dataset  {dataset.name}  sha256:{order.dataset_digest[:16]}…  "
        f"({data.n_sequences} sequences x {data.seq_len} tokens)",
    ]
    span = f"positions {first}..{first + size - 1}, epoch {order.epoch(position)}"
    if where is None:
        lines.append(f"order    seed {seed}, batch size {size}, step {position} (the order's, 0-based): {span}")
    else:
        lines.append(
            f"order    seed {seed}, batch size {size}: training step {args.step} (1-based) = data position "
            f"{position} (offset {where.offset}): {span}"
        )
    shown_ranks = "every row on rank 0" if world == 1 else f"{size // world} rows per rank"
    lines.append(f"ranks    world size {world} ({world_from}): {shown_ranks}")
    if args.rank is not None:
        lines[-1] += f"; showing rank {args.rank}'s rows"
    for s in samples:
        lines.append(f"[{s.position}] sequence {s.sequence}  (epoch {s.epoch}, rank {ranks[s.position]})")
        for d in s.documents:
            lines.append(
                f"     {d.id}  [doc {d.document}] tokens {d.doc_start}..{d.doc_end} -> positions {d.start}..{d.end}"
            )
        if s.pad_tokens:
            lines.append(f"     <pad> x {s.pad_tokens}")
        text = s.text if len(s.text) <= args.width else s.text[: args.width] + "…"
        lines.append(f"     text {json.dumps(text, ensure_ascii=False)}")
    for line in lines:
        print(safe(line))
    return 0


def _cmd_fork(args: argparse.Namespace) -> int:
    from flowpin.replay.fork import fork

    root = find_root()
    manifest = fork(Path(args.manifest), step=args.step, overrides=list(args.overrides), root=root, out=args.out)
    print(f"fork recorded: {manifest.relative_to(root) if manifest.is_relative_to(root) else manifest}")
    return 0


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from flowpin.replay.rebuild import RebuildOptions, exit_status, flow_manifests, rebuild_many, render_result

    root = find_root()
    paths = [Path(p) for p in args.paths] or (flow_manifests(root) if args.all else [])
    if not paths:
        raise FlowpinError("nothing to rebuild: name manifest files or pass --all (rebuilds manifests/*.json)")
    options = RebuildOptions(
        workdir=Path(args.workdir) if args.workdir else None, keep=args.keep, allow_code_drift=args.allow_code_drift
    )
    results = []
    t0 = time.monotonic()
    for result in rebuild_many(paths, root=root, options=options, stages=args.stage):
        results.append(result)
        if not args.json:
            print(render_result(result), flush=True)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2, sort_keys=True))
    else:
        counts = {v: sum(r.verdict == v for r in results) for v in ("identical", "differs", "error")}
        print(
            f"rebuild: {counts['identical']} identical, {counts['differs']} differ, {counts['error']} could not be "
            f"rebuilt ({time.monotonic() - t0:.1f} s)"
        )
    return exit_status(results)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from flowpin.manifest.verify import verify_manifest
    from flowpin.signing import load_trust_store
    from flowpin.sweep import read_sweep, render_sweep

    root = find_root()
    trusted = load_trust_store(root)
    cache = default_cache(root)
    hasher = Hasher(root, DEFAULT_ALGORITHM, cache=cache)

    def verify(path: Path) -> str | None:
        report = verify_manifest(path, root=root, trusted=trusted, hasher=hasher)
        return None if report.ok else str(report.findings[0])

    try:
        table = read_sweep(Path(args.sweep_dir), verify=verify, metrics=args.metric or None)
    finally:
        cache.close()
    print(json.dumps(table.as_dict(), indent=2, sort_keys=True) if args.json else render_sweep(table))
    return 0 if table.ok else 1


def _cmd_release_export(args: argparse.Namespace) -> int:
    from flowpin.replay.release import export_release

    r = export_release(find_root(), Path(args.dir), force=args.force)
    print(
        f"release of {r.commit[:12]} written to {r.target}: {r.files} files, {r.bytes / 1e6:.1f} MB, "
        f"{r.store_objects} store objects, stages {', '.join(r.stages)}; signed by {r.keyid[:16]}… "
        f"({r.seconds:.1f} s)\n"
        f"publish this keyid out of band; importers check it with --expect-keyid: {r.keyid}"
    )
    if r.unreleased:
        print(f"not in dvc.lock, so not released: {', '.join(r.unreleased)}")
    return 0


def _keyid_arg(value: str) -> str:
    from flowpin.replay.release import check_keyid_prefix

    try:
        return check_keyid_prefix(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cmd_release_import(args: argparse.Namespace) -> int:
    import subprocess

    from flowpin.replay.release import REMOTE_NAME, import_release

    root = find_root()
    r = import_release(root, Path(args.dir), expect_keyid=args.expect_keyid)
    print(
        f"release {r.release} verified: commit {r.commit[:12]}, signed by {r.keyid[:16]}… "
        f"({'the expected key' if args.expect_keyid else 'trusted in keys/; no --expect-keyid given'}), "
        f"{r.files} files, {r.store_objects} store objects ({r.seconds:.1f} s)\n"
        f"DVC remote '{REMOTE_NAME}' -> {r.remote} is the default in .dvc/config.local"
    )
    if args.pull:
        pull = subprocess.run([sys.executable, "-m", "dvc", *r.pull[1:], "-r", REMOTE_NAME], cwd=root, check=False)
        if pull.returncode != 0:
            print(f"flowpin: {' '.join(r.pull)} failed (exit {pull.returncode})", file=sys.stderr)
            return 1
    if args.verify:
        return _cmd_verify(argparse.Namespace(paths=[], all=True, trust=[], no_cache=True))  # cache: no evidence
    if not args.pull:
        print(f"next: {' '.join(r.pull)} && flowpin verify --all")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowpin", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"flowpin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    key = sub.add_parser("key", help="manage the signing key and trust store")
    ksub = key.add_subparsers(dest="key_command", required=True)
    ki = ksub.add_parser("init", help="create a local Ed25519 signing key (0600) and trust its public key")
    ki.add_argument("--path", help="where to write the private key (default .flowpin/keys/signing.key)")
    ki.add_argument("--force", action="store_true", help="replace an existing key")
    ki.add_argument("--if-missing", action="store_true", help="do nothing when a key already exists")
    ki.set_defaults(func=_cmd_key_init)
    kl = ksub.add_parser("list", help="list trusted keyids (keys/*.pub)")
    kl.set_defaults(func=_cmd_key_list)

    ms = sub.add_parser(
        "model-sign",
        help="sign/verify checkpoints in the OpenSSF model-signing format (EC P-256; docs/model-signing.md)",
        description="Exit status: 0 success, 1 verification failed (named reason), 2 usage or input error.",
    )
    mssub = ms.add_subparsers(dest="model_sign_command", required=True)
    mki = mssub.add_parser(
        "key-init", help="create an EC P-256 model-signing key (0600) and trust it in keys/model-signing/"
    )
    mki.add_argument("--if-missing", action="store_true", help="do nothing when the key already exists")
    mki.add_argument("--force", action="store_true", help="replace an existing key")
    mki.set_defaults(func=_cmd_model_sign_key_init)
    for name, func, verb in (
        ("sign", _cmd_model_sign_sign, "write"),
        ("verify", _cmd_model_sign_verify, "read"),
    ):
        msc = mssub.add_parser(name, help=f"{name} a checkpoint directory (step-NNNNNN/)")
        msc.add_argument("checkpoint", help="checkpoint directory, e.g. runs/pretrain/checkpoints/step-000100")
        msc.add_argument(
            "--signature",
            help=f"bundle to {verb} (default <run>/model-signatures/step-NNNNNN.sig for a checkpoint in "
            "checkpoints/, else <checkpoint>.sig)",
        )
        msc.set_defaults(func=func)

    v = sub.add_parser("verify", help="check schema, signature, trust and every digest of manifests")
    v.add_argument("paths", nargs="*", help="manifest files")
    v.add_argument("--all", action="store_true", help="verify every manifest under manifests/")
    v.add_argument("--trust", action="append", default=[], metavar="DIR", help="extra directory of trusted *.pub")
    v.add_argument("--no-cache", action="store_true", help="re-read every file (ignore the stat cache)")
    v.set_defaults(func=_cmd_verify)

    d = sub.add_parser(
        "diff",
        help="semantic diff of two manifests or two manifest directories, verdict first",
        description="Prints the verdict first (outputs identical in K of N; outputs identical but identity "
        "differs in M: which pairs, in which sections; outputs differ in J: which pairs; manifests on one side "
        "only; UNVERIFIED manifests), then one block per pair. Every manifest's signature is checked against "
        "keys/ and marked VERIFIED or UNVERIFIED. Exit status: 0 every pair identical in identity; 1 some "
        "outputs differ (or a manifest is on one side only); 2 usage or input error (a manifest that cannot be "
        "read); 3 every output identical, but the identity differs (recipe, entry point, inputs, code or "
        "environment; run metadata too with --include-run).",
    )
    d.add_argument(
        "a", metavar="A", help="a manifest file, or a directory of manifests (paired with B's by relative path)"
    )
    d.add_argument("b", metavar="B", help="the manifest file or directory to compare A with")
    d.add_argument("--json", action="store_true", help='{"verdict": {...}, "diffs": [one object per pair]}')
    d.add_argument("--include-run", action="store_true", help="also compare run metadata (times, host)")
    d.set_defaults(func=_cmd_diff)

    lin = sub.add_parser("lineage", help="walk parent manifests back to raw inputs")
    lin.add_argument("path", help="the manifest to start from (e.g. manifests/eval.json)")
    lin.add_argument("--json", action="store_true", help="the tree as JSON")
    lin.set_defaults(func=_cmd_lineage)

    f = sub.add_parser("fork", help="continue a training stage from its checkpoint at a step, under overrides")
    f.add_argument("manifest", help="the training stage's manifest (e.g. manifests/pretrain.json)")
    f.add_argument("--step", type=int, required=True, help="the checkpoint step to continue from")
    f.add_argument("--out", help="run directory for the fork (default runs/forks/<stage>-step<N>-<hash>)")
    f.add_argument("overrides", nargs="*", help="Hydra overrides for the new branch (e.g. train.loop.steps=300)")
    f.set_defaults(func=_cmd_fork)

    rb = sub.add_parser(
        "rebuild",
        help="re-run stages in a scratch workspace from what their manifests pin and compare every output digest",
        description="Exit status: 0 every rebuild identical, 1 some outputs differ, 2 some stage could not be "
        "rebuilt (missing or changed input, code drift, the stage failed).",
    )
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

    sw = sub.add_parser(
        "sweep",
        help="table of a Hydra sweep's jobs: the overrides that differ, status, final metrics",
        description="Exit status: 0 every planned job ran and its manifest verifies, 1 some job failed, is "
        "missing, still running or does not verify, 2 not a sweep directory.",
    )
    sw.add_argument("sweep_dir", help="the sweep directory a `-m` run writes (multirun/<date>/<time>-<id>)")
    sw.add_argument(
        "--metric", action="append", default=[], metavar="KEY", help="report key to show (dotted, repeatable)"
    )
    sw.add_argument("--json", action="store_true", help="the table as JSON")
    sw.set_defaults(func=_cmd_sweep)

    rel = sub.add_parser("release", help="export the release to a directory another lab can replay, or import one")
    rsub = rel.add_subparsers(dest="release_command", required=True)
    rx = rsub.add_parser(
        "export",
        help="manifests, keys, dvc.yaml/dvc.lock, recipes, a git bundle and the DVC store, signed (release.json)",
        description="Refuses an incoherent release: uncommitted changes, `dvc status` not clean, a manifest "
        "that does not verify, an output missing from the DVC cache. See docs/release.md.",
    )
    rx.add_argument("dir", help="a new (or empty) directory outside the repository")
    rx.add_argument("--force", action="store_true", help="replace a non-empty DIR whole")
    rx.set_defaults(func=_cmd_release_export)
    ri = rsub.add_parser(
        "import",
        help="in a clone of the release: check release.json against keys/ and every file, set the store as DVC remote",
        description="Exit status: 0 imported (and pulled/verified when asked), 1 dvc pull or verify failed, "
        "2 the release was refused (not a release, tampered, untrusted signature, wrong commit, missing object).",
    )
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

    s = sub.add_parser("show", help="human summary of a manifest")
    s.add_argument("path", help="a manifest file (e.g. manifests/pretrain.json)")
    s.add_argument("--json", action="store_true", help="print the decoded statement")
    s.add_argument(
        "--digests", action="store_true", help="also re-hash every subject and dependency (as flowpin verify)"
    )
    s.set_defaults(func=_cmd_show)

    ui = sub.add_parser("ui", help="open the Aim UI of the project's runs (.aim) on 127.0.0.1 until Ctrl-C")
    ui.add_argument("--port", type=int, default=43800, help="port on 127.0.0.1 (0: a free one; default 43800)")
    ui.add_argument("--repo", help="directory holding the .aim repository (default: the project root)")
    ui.set_defaults(func=_cmd_ui)

    b = sub.add_parser(
        "batch",
        help="which sequences, documents and text training step N saw, and on which data-parallel rank",
        description="PATH is a training manifest (manifests/pretrain.json, midtrain.json, longctx.json, a fork's "
        "manifest.json) or one of its checkpoint directories: the run fixes the order (train.order_seed, "
        "train.loop.batch_size) and --step is the training step. Or PATH is a tokenize manifest, a tokenize recipe "
        "or a tokenized dataset directory: then --order-seed and --batch-size are required and --step is the "
        "order's 0-based step.",
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `flowpin fork M --step N a=b c=d`: argparse cannot take positionals after an option, so Hydra
    # overrides (key=value) left over go to fork; anything else is still an error.
    if extra and args.command == "fork" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from flowpin.hashing import reporting_progress
    from flowpin.progress import hash_progress

    try:
        try:
            with hash_progress() as bar, reporting_progress(bar):  # long hashing (verify, rebuild…): a bar on a TTY
                status = int(args.func(args))
            sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is caught below
            return status
        except FlowpinError as exc:
            print(f"flowpin: {type(exc).__name__}: {safe_lines(exc)}", file=sys.stderr)
            return 2
    except BrokenPipeError:
        return _stdout_closed()


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
    return 141


if __name__ == "__main__":
    sys.exit(main())
