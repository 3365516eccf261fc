"""No pickle (and no other code-executing deserialiser) on any path of flowpin's code.

A static scan of ``src/``, ``stages/`` and ``benchmarks/``: the AST of every module is walked with its
import aliases resolved (``import torch as t``, ``from numpy import load as npload``), and these are
violations:

* importing or calling ``pickle``/``cPickle``/``_pickle``/``cloudpickle``/``dill``/``marshal``/``shelve``,
  ``joblib.load``, ``pandas.read_pickle``;
* ``torch.load`` (or ``torch.jit.load``) without a literal ``weights_only=True``; anything from
  ``torch.serialization`` (its unpickling machinery: ``load``, ``add_safe_globals``, ``safe_globals`` ...);
* ``numpy.load`` with ``allow_pickle`` other than a literal ``False``;
* ``yaml.load``/``yaml.load_all`` without a literal safe loader, ``yaml.unsafe_load``, ``yaml.full_load``
  (its FullLoader could construct Python objects; flowpin's recipes need none) and the unsafe loader classes;
* the builtins ``eval``, ``exec`` and ``compile``.

:data:`ALLOWED` is the reviewed allowlist (empty): an entry needs a comment saying why it is safe. The
scanner's self-tests below feed it synthetic snippets of each pattern (so this test can fail) and the
safe forms (so it does not cry wolf). A runtime check (``test_loading_never_unpickles``) complements the
scan: checkpoint, manifest and shard reads work with every unpickling entry point made to raise.
"""

from __future__ import annotations

import ast
import dataclasses
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import one_step_state

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("src", "stages", "benchmarks")

ALLOWED: frozenset[tuple[str, int, str]] = frozenset()
"""``(repository-relative path, line, rule)`` of reviewed exceptions; each needs a comment with the reason."""

_PICKLE_MODULES = frozenset({"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve"})
_BANNED_CALLS = {
    "joblib.load": "joblib.load unpickles",
    "pandas.read_pickle": "pandas.read_pickle unpickles",
    "yaml.unsafe_load": "yaml.unsafe_load constructs arbitrary Python objects",
    "yaml.unsafe_load_all": "yaml.unsafe_load_all constructs arbitrary Python objects",
    "yaml.full_load": "yaml.full_load (FullLoader) constructs Python objects; use yaml.safe_load",
    "yaml.full_load_all": "yaml.full_load_all (FullLoader) constructs Python objects; use yaml.safe_load_all",
}
_BANNED_NAMES = {
    "torch.serialization": "torch.serialization is torch's unpickling machinery",
    "yaml.Loader": "yaml.Loader constructs arbitrary Python objects",
    "yaml.UnsafeLoader": "yaml.UnsafeLoader constructs arbitrary Python objects",
    "yaml.FullLoader": "yaml.FullLoader constructs Python objects",
    "yaml.CLoader": "yaml.CLoader constructs arbitrary Python objects",
    "yaml.CUnsafeLoader": "yaml.CUnsafeLoader constructs arbitrary Python objects",
    "yaml.CFullLoader": "yaml.CFullLoader constructs Python objects",
}
_SAFE_YAML_LOADERS = frozenset({"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"})
_BUILTIN_EXEC = frozenset({"eval", "exec", "compile"})


@dataclasses.dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}"


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str, tree: ast.Module) -> None:
        self.path = path
        self.found: list[Violation] = []
        self.aliases: dict[str, str] = {}
        # names the module itself binds at any level (a local ``def compile`` is not the builtin)
        self.shadowed: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    local = a.asname or a.name.split(".")[0]
                    self.aliases[local] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.shadowed.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.shadowed.add(node.id)

    def flag(self, node: ast.AST, rule: str) -> None:
        self.found.append(Violation(self.path, getattr(node, "lineno", 0), rule))

    def qualified(self, node: ast.expr) -> str | None:
        """``np.load`` → ``numpy.load`` through the module's import aliases; None if not a dotted name."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        base = self.aliases.get(node.id, node.id)
        return ".".join([base, *reversed(parts)])

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._check_module(node, a.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        self._check_module(node, module)
        for a in node.names:
            self._check_name(node, f"{module}.{a.name}")
        self.generic_visit(node)

    def _check_module(self, node: ast.AST, module: str) -> None:
        if module.split(".")[0] in _PICKLE_MODULES:
            self.flag(node, f"imports {module} (code-executing deserialiser)")
        elif module == "torch.serialization" or module.startswith("torch.serialization."):
            self.flag(node, _BANNED_NAMES["torch.serialization"])

    def _check_name(self, node: ast.AST, name: str) -> None:
        if name in _BANNED_CALLS:
            self.flag(node, _BANNED_CALLS[name])
        for banned, rule in _BANNED_NAMES.items():
            if name == banned or name.startswith(banned + "."):
                self.flag(node, rule)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = self.qualified(node)
        if name is not None:
            for banned, rule in _BANNED_NAMES.items():
                if name == banned:
                    self.flag(node, rule)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualified(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg is not None}
        if name is not None:
            root = name.split(".")[0]
            if root in _PICKLE_MODULES:
                self.flag(node, f"calls {name} (code-executing deserialiser)")
            elif name in _BANNED_CALLS:
                self.flag(node, _BANNED_CALLS[name])
            elif name in ("torch.load", "torch.jit.load") and not _is_const(kwargs.get("weights_only"), True):
                self.flag(node, f"{name} without weights_only=True unpickles")
            elif name == "numpy.load" and "allow_pickle" in kwargs and not _is_const(kwargs["allow_pickle"], False):
                self.flag(node, "numpy.load with allow_pickle other than False unpickles")
            elif name in ("yaml.load", "yaml.load_all") and not self._safe_yaml_loader(node, kwargs):
                self.flag(node, f"{name} without a safe Loader (use yaml.safe_load)")
            elif (
                isinstance(node.func, ast.Name) and name in _BUILTIN_EXEC and node.func.id not in self.shadowed
            ) or name in {f"builtins.{b}" for b in _BUILTIN_EXEC}:
                self.flag(node, f"calls the builtin {name.removeprefix('builtins.')} (executes code)")
        self.generic_visit(node)

    def _safe_yaml_loader(self, node: ast.Call, kwargs: dict[str, ast.expr]) -> bool:
        loader = kwargs.get("Loader", node.args[1] if len(node.args) > 1 else None)
        return loader is not None and self.qualified(loader) in _SAFE_YAML_LOADERS


def _is_const(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, path: str = "<snippet>") -> list[Violation]:
    tree = ast.parse(source, filename=path)
    scanner = _Scanner(path, tree)
    scanner.visit(tree)
    return scanner.found


def python_files() -> Iterator[Path]:
    for top in SCANNED:
        yield from sorted((REPO / top).rglob("*.py"))


# --- the scan of the code base ----------------------------------------------------------------------


def test_code_base_has_no_unpickling_path() -> None:
    files = list(python_files())
    assert len(files) > 50, "the scan found too few files; did the layout change?"
    found = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        found += [v for v in scan_source(path.read_text("utf-8"), rel) if (v.path, v.line, v.rule) not in ALLOWED]
    assert not found, "code-executing deserialisers found:\n" + "\n".join(map(str, found))


def test_allowlist_entries_still_match_something() -> None:
    """A stale allowlist entry would silently allow whatever later lands on that line."""
    for path, line, rule in ALLOWED:
        hits = scan_source((REPO / path).read_text("utf-8"), path)
        assert Violation(path, line, rule) in hits, f"stale allowlist entry {path}:{line}"


# --- the scanner catches every pattern ----------------------------------------------------------------


BAD = {
    "import-pickle": "import pickle\n",
    "import-cpickle-alias": "import _pickle as p\n",
    "from-pickle": "from pickle import loads\n",
    "pickle-call-via-alias": "import pickle as pk\npk.loads(b'')\n",
    "dill": "import dill\n",
    "cloudpickle": "import cloudpickle\n",
    "marshal": "import marshal\nmarshal.loads(b'')\n",
    "shelve": "import shelve\nshelve.open('x')\n",
    "joblib-load": "import joblib\njoblib.load('x')\n",
    "joblib-from-import": "from joblib import load\n",
    "pandas-read-pickle": "import pandas as pd\npd.read_pickle('x')\n",
    "torch-load-bare": "import torch\ntorch.load('x')\n",
    "torch-load-weights-only-false": "import torch\ntorch.load('x', weights_only=False)\n",
    "torch-load-weights-only-variable": "import torch\nflag = True\ntorch.load('x', weights_only=flag)\n",
    "torch-load-from-import": "from torch import load\nload('x')\n",
    "torch-load-alias": "import torch as t\nt.load('x')\n",
    "torch-jit-load": "import torch\ntorch.jit.load('x')\n",
    "torch-serialization-attr": "import torch\ntorch.serialization.add_safe_globals([object])\n",
    "torch-serialization-import": "from torch.serialization import load\n",
    "torch-serialization-module": "import torch.serialization\n",
    "np-load-allow-pickle": "import numpy as np\nnp.load('x', allow_pickle=True)\n",
    "numpy-load-allow-pickle-variable": "import numpy\nok = True\nnumpy.load('x', allow_pickle=ok)\n",
    "np-load-from-import": "from numpy import load as l\nl('x', allow_pickle=True)\n",
    "yaml-load-no-loader": "import yaml\nyaml.load('a: 1')\n",
    "yaml-load-unsafe-loader": "import yaml\nyaml.load('a: 1', Loader=yaml.UnsafeLoader)\n",
    "yaml-load-full-loader-positional": "import yaml\nyaml.load('a: 1', yaml.FullLoader)\n",
    "yaml-load-all": "import yaml\nyaml.load_all('a: 1')\n",
    "yaml-unsafe-load": "import yaml\nyaml.unsafe_load('a: 1')\n",
    "yaml-full-load": "import yaml\nyaml.full_load('a: 1')\n",
    "yaml-from-import-unsafe": "from yaml import unsafe_load\nunsafe_load('a')\n",
    "eval": "x = eval('1 + 1')\n",
    "exec": "def f(src: str) -> None:\n    exec(src)\n",
    "compile": "code = compile('1', 'f', 'eval')\n",
    "builtins-eval": "import builtins\nbuiltins.eval('1')\n",
}


@pytest.mark.parametrize("source", BAD.values(), ids=BAD.keys())
def test_scanner_catches(source: str) -> None:
    assert scan_source(source), f"not caught:\n{source}"


GOOD = {
    "torch-load-weights-only": "import torch\ntorch.load('x', weights_only=True)\n",
    "np-load-default": "import numpy as np\nnp.load('x.npy')\n",
    "np-load-allow-pickle-false": "import numpy as np\nnp.load('x.npy', allow_pickle=False)\n",
    "yaml-safe-load": "import yaml\nyaml.safe_load('a: 1')\nyaml.safe_dump({})\n",
    "yaml-load-safe-loader": "import yaml\nyaml.load('a: 1', Loader=yaml.SafeLoader)\n",
    "yaml-load-csafe-positional": "import yaml\nyaml.load('a: 1', yaml.CSafeLoader)\n",
    "method-named-eval": "model = object()\nmodel.eval()\n",
    "re-compile": "import re\nre.compile('x')\n",
    "local-compile": "def compile(x: int) -> int:\n    return x\ncompile(1)\n",
    "json-and-safetensors": "import json\nfrom safetensors.torch import load\njson.loads('1')\nload(b'')\n",
    "pickle-in-a-string": "note = 'never import pickle; torch.load is banned'\n",
}


@pytest.mark.parametrize("source", GOOD.values(), ids=GOOD.keys())
def test_scanner_accepts(source: str) -> None:
    assert scan_source(source) == []


# --- at run time: loading never reaches an unpickler -----------------------------------------------


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a checkpoint, verifying a manifest and reading shards, with every unpickler made to raise.

    (Saving under the same guard is tested in test_checkpoint.py ``test_no_pickle_anywhere``.)
    """
    import numpy as np
    import torch
    from torch import nn

    from flowpin.data.shards import read_dataset, write_dataset
    from flowpin.hashing import Hasher
    from flowpin.manifest.record import record
    from flowpin.manifest.verify import verify_manifest
    from flowpin.signing import init_key, load_trust_store
    from flowpin.train.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path / "proj"
    (root / ".dvc").mkdir(parents=True)
    signer = init_key(root, key_path=root / ".flowpin" / "signing.key")
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = one_step_state(model, opt, torch.ones(2, 4))
    save_checkpoint(root / "ck", state, model=model, optimizer=opt)
    write_dataset([{"id": "a", "text": "x"}], root / "data", docs_per_shard=1, level=3)
    with record("train", recipe={}, code=[], root=root, signer=signer) as rec:
        rec.output("ck")
        rec.output("data")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unpickler was called")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(torch.serialization, "load", boom)
    monkeypatch.setattr(np, "load", boom)

    fresh = nn.Linear(4, 3)
    loaded = load_checkpoint(root / "ck", model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert loaded.step == 1
    assert torch.equal(fresh.weight, model.weight)
    report = verify_manifest(
        root / "manifests" / "train.json", root=root, trusted=load_trust_store(root), hasher=Hasher(root, workers=1)
    )
    assert report.ok, report.findings
    assert [r["id"] for r in read_dataset(root / "data")] == ["a"]
