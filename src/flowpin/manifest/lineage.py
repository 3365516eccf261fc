"""``flowpin lineage``: walk a manifest's parent manifests back to the raw inputs.

Parents are dependencies of kind ``manifest``. Each edge is checked: a parent that is missing, that no
longer has the digest the child pinned, that does not parse, or that closes a cycle is reported on the
node (the walk continues elsewhere).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flowpin.errors import FlowpinError, LineageError
from flowpin.manifest.model import load_manifest


@dataclasses.dataclass
class Node:
    manifest: str
    stage: str | None = None
    outputs: list[str] = dataclasses.field(default_factory=list)
    raw_inputs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    parents: list[Node] = dataclasses.field(default_factory=list)
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "stage": self.stage,
            "outputs": self.outputs,
            "rawInputs": self.raw_inputs,
            "problem": self.problem,
            "parents": [p.as_dict() for p in self.parents],
        }

    def problems(self) -> list[str]:
        own = [f"{self.manifest}: {self.problem}"] if self.problem else []
        return own + [p for parent in self.parents for p in parent.problems()]


def lineage(path: Path, root: Path) -> Node:
    return _walk(path, root, stack=(), pinned=None)


def _walk(path: Path, root: Path, stack: tuple[str, ...], pinned: tuple[str, str] | None) -> Node:
    """``pinned`` is the (algorithm, digest) the child recorded for this manifest file."""
    name = path.relative_to(root).as_posix() if path.is_absolute() and root in path.parents else str(path)
    node = Node(manifest=name)
    if name in stack:
        node.problem = str(LineageError(f"cycle: {' → '.join((*stack, name))}"))
        return node
    try:
        m = load_manifest(path if path.is_absolute() else root / path)
    except FlowpinError as exc:
        missing = not (path if path.is_absolute() else root / path).exists()
        node.problem = f"{'missing parent' if missing else type(exc).__name__}: {exc}"
        return node
    node.stage = m.stage
    node.outputs = [s["name"] for s in m.subjects]
    if pinned is not None:
        algo, want = pinned  # the child's digest algorithm, not necessarily sha256
        have = m.outputs_digest(algo)
        if have != want:
            node.problem = (
                f"outputs changed since the child pinned them ({algo} {have[:16]}…, pinned {want[:16]}…); "
                "re-run the downstream stages"
            )
    for dep in m.dependencies:
        kind = dep["annotations"]["kind"]
        if kind == "manifest":
            algo, digest = next(iter(sorted(dep["digest"].items())))
            node.parents.append(_walk(root / dep["name"], root, (*stack, name), (algo, digest)))
        elif kind != "code" and kind != "config":
            algo, value = next(iter(sorted(dep["digest"].items())))
            node.raw_inputs.append({"name": dep["name"], "kind": kind, "digest": f"{algo}:{value}"})
    return node


def render_tree(node: Node, indent: str = "") -> str:
    label = f"{node.manifest} [{node.stage or '?'}]"
    lines = [indent + label + (f"  !! {node.problem}" if node.problem else "")]
    for out in node.outputs:
        lines.append(f"{indent}  ⇒ {out}")
    for raw in node.raw_inputs:
        lines.append(f"{indent}  ← {raw['name']} ({raw['kind']}, {raw['digest'][:23]}…)")
    for parent in node.parents:
        lines.append(render_tree(parent, indent + "  ↑ "))
    return "\n".join(lines)
