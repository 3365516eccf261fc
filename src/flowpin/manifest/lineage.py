"""``flowpin lineage``: walk a manifest's parent manifests back to the raw inputs.

Parents are dependencies of kind ``manifest``. The walk is linear in manifests + edges: each manifest
file (by its name in the repository) is read, schema-checked and signature-checked once
(:func:`~flowpin.manifest.trust.check_signature`: signed by a trusted key, or marked UNVERIFIED), however
many children share it; the walk is iterative, so depth is bounded by memory, not the call stack.

Problems are reported where they belong:

* on a **node** (once): a manifest that is missing, does not parse, or does not verify;
* on an **edge** (child → parent): the parent no longer records the outputs the child pinned (its
  subject-list digest, :func:`~flowpin.manifest.trust.pinned`), a parent name that is not a safe
  repository path, or a parent that closes a cycle (that edge is not followed).

Rendering (text and JSON) expands a shared ancestor the first time it is met in depth-first order and
refers back to it after ("(see above)", ``"seeAbove": true``). Digests of the artifacts themselves are not
re-hashed here: ``flowpin verify`` does that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin.display import safe
from flowpin.errors import FlowpinError, LineageError, ManifestError, UnverifiedManifestError
from flowpin.manifest.statement import Manifest, entry_kind, load_manifest
from flowpin.manifest.trust import check_signature, pinned
from flowpin.paths import resolve_inside
from flowpin.signing import load_trust_store


@dataclasses.dataclass(eq=False)
class Node:
    """One manifest of the lineage (one object per manifest, shared by every child that names it)."""

    manifest: str
    stage: str | None = None
    outputs: list[str] = dataclasses.field(default_factory=list)
    raw_inputs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    parents: list[Edge] = dataclasses.field(default_factory=list)
    problem: str | None = None
    """The manifest's own problem: missing, unreadable, or not signed by a trusted key."""
    verified: bool = False
    """Signed by a trusted key (digests of its artifacts are not re-hashed by lineage)."""
    signer: str | None = None
    """The trusted keyid that verified, when ``verified``."""

    def walk(self) -> Iterator[Node]:
        """Every distinct node reachable from this one (itself first), each once."""
        seen = {id(self)}
        todo = [self]
        while todo:
            node = todo.pop()
            yield node
            for edge in reversed(node.parents):
                if id(edge.node) not in seen:
                    seen.add(id(edge.node))
                    todo.append(edge.node)

    def problems(self) -> list[str]:
        """Each node problem once and each edge problem, as ``<manifest>: <problem>``."""
        out: list[str] = []
        for node in self.walk():
            if node.problem:
                out.append(f"{node.manifest}: {node.problem}")
            out.extend(f"{edge.node.manifest}: {edge.problem}" for edge in node.parents if edge.problem)
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON form: a tree in depth-first order, each manifest expanded once (later: ``seeAbove``)."""
        expanded: set[int] = set()
        top: list[dict[str, Any]] = []
        todo: list[tuple[Node, Edge | None, list[dict[str, Any]]]] = [(self, None, top)]
        while todo:  # depth-first, as render_tree: "seeAbove" always refers to an entry printed earlier
            node, edge, into = todo.pop()
            entry = node._entry(edge, expanded)
            into.append(entry)
            if not entry.get("seeAbove"):
                todo.extend((e.node, e, entry["parents"]) for e in reversed(node.parents))
        return top[0]

    def _entry(self, edge: Edge | None, expanded: set[int]) -> dict[str, Any]:
        problems = [p for p in (edge.problem if edge else None, self.problem) if p]
        repeat = id(self) in expanded or (edge is not None and edge.cycle)
        entry: dict[str, Any] = {
            "manifest": self.manifest,
            "stage": self.stage,
            "verified": self.verified,
            "signer": self.signer,
            "problem": "; ".join(problems) or None,
            "parents": [],
        }
        if repeat:
            entry["seeAbove"] = True
            return entry
        expanded.add(id(self))
        entry.update(outputs=self.outputs, rawInputs=self.raw_inputs)
        return entry


@dataclasses.dataclass(eq=False)
class Edge:
    """A child's dependency on a parent manifest."""

    node: Node
    problem: str | None = None
    cycle: bool = False
    """The parent is on the path from the start to the child: the edge is reported, not followed."""


def lineage(path: Path, root: Path, *, trusted: dict[str, Ed25519PublicKey] | None = None) -> Node:
    """The lineage graph from ``path`` (see the module docstring); ``trusted`` defaults to ``keys/*.pub``."""
    store = load_trust_store(root) if trusted is None else trusted
    nodes: dict[str, Node] = {}
    manifests: dict[str, Manifest] = {}

    def open_node(name: str, file: Path) -> Node:
        node = Node(manifest=name)
        nodes[name] = node
        try:
            m = load_manifest(file)
        except FlowpinError as exc:
            missing = not file.exists()
            node.problem = f"{'missing parent' if missing else type(exc).__name__}: {exc}"
            return node
        manifests[name] = m
        node.stage = m.stage
        node.outputs = [s["name"] for s in m.subjects]
        try:
            node.signer = check_signature(m, store, purpose="vouch for it in the lineage")
            node.verified = True
        except UnverifiedManifestError as exc:
            node.problem = f"UNVERIFIED: {exc}"
        for dep in m.dependencies:
            kind = entry_kind(dep) or "?"  # every dependency has one (schema)
            if kind not in ("manifest", "code", "config"):
                node.raw_inputs.append({"name": dep["name"], "kind": kind, "digest": _digest(dep)})
        return node

    start = _name(path, root)
    top = open_node(start, path if path.is_absolute() else root / path)
    stack: list[tuple[Node, Iterator[dict[str, Any]]]] = [(top, _parent_deps(manifests.get(start)))]
    on_path: list[str] = [start]
    while stack:
        node, deps = stack[-1]
        dep = next(deps, None)
        if dep is None:
            stack.pop()
            on_path.pop()
            continue
        name = str(dep["name"])
        try:
            file = resolve_inside(name, root)
        except FlowpinError as exc:
            node.parents.append(Edge(Node(manifest=name, problem=f"{type(exc).__name__}: {exc}")))
            continue
        name = _name(file, root)
        if name in on_path:
            cycle = LineageError(f"cycle: {' → '.join((*on_path, name))}")
            node.parents.append(Edge(nodes[name], problem=str(cycle), cycle=True))
            continue
        fresh = name not in nodes
        parent = open_node(name, file) if fresh else nodes[name]
        node.parents.append(Edge(parent, problem=_changed(dep, manifests.get(name))))
        if fresh:
            stack.append((parent, _parent_deps(manifests.get(name))))
            on_path.append(name)
    return top


def _parent_deps(m: Manifest | None) -> Iterator[dict[str, Any]]:
    return iter([] if m is None else m.parents)


def _name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _changed(dep: dict[str, Any], parent: Manifest | None) -> str | None:
    """The edge problem when ``parent`` no longer records the outputs the child pinned."""
    if parent is None:
        return None  # the node's own problem says why
    try:
        algo, want = pinned(dep)  # the child's digest algorithm, not necessarily sha256
    except ManifestError as exc:
        return f"{type(exc).__name__}: {exc}"
    have = parent.outputs_digest(algo)
    if have == want:
        return None
    return (
        f"outputs changed since the child pinned them ({algo} {have[:16]}…, pinned {want[:16]}…); "
        "re-run the downstream stages"
    )


def _digest(dep: dict[str, Any]) -> str:
    try:
        algo, value = pinned(dep)
    except ManifestError:
        return "(no flowpin digest)"
    return f"{algo}:{value}"


def render_tree(node: Node) -> str:
    """Text form: one line per manifest (VERIFIED or UNVERIFIED), its outputs and raw inputs; a shared
    ancestor is expanded once, then "(see above)". Every string from a manifest is escaped (:func:`safe`)."""
    lines: list[str] = []
    expanded: set[int] = set()
    todo: list[tuple[Node, Edge | None, str]] = [(node, None, "")]
    while todo:
        current, edge, indent = todo.pop()
        problems = [p for p in (edge.problem if edge else None, current.problem) if p]
        mark = f"VERIFIED (signed by {safe(current.signer)[:16]}…)" if current.verified else "UNVERIFIED"
        label = f"{indent}{safe(current.manifest)} [{safe(current.stage or '?')}] {mark}"
        if id(current) in expanded or (edge is not None and edge.cycle):
            lines.append(label + " (see above)" + "".join(f"  !! {safe(p)}" for p in problems))
            continue
        expanded.add(id(current))
        lines.append(label + "".join(f"  !! {safe(p)}" for p in problems))
        lines.extend(f"{indent}  ⇒ {safe(out)}" for out in current.outputs)
        lines.extend(
            f"{indent}  ← {safe(raw['name'])} ({safe(raw['kind'])}, {safe(raw['digest'][:23])}…)"
            for raw in current.raw_inputs
        )
        todo.extend((e.node, e, indent + "  ↑ ") for e in reversed(current.parents))
    return "\n".join(lines)
