"""The README's shell commands work as typed in a fresh shell whose only set-up is the activation step (#19).

Every command of the README's ```bash/```sh/```console blocks is either run here or skipped by name in
:data:`SKIPPED` (which says why), and :data:`RUN` says what each run must give: a new README command fails
:func:`test_every_readme_command_is_run_here_or_skipped_by_name` until it is put in one of them. Commands only
mentioned inline in prose are not extracted.

Each command runs in a new ``bash`` with nothing inherited: ``PATH=/usr/bin:/bin``, ``HOME`` (empty), ``LANG``,
no ``VIRTUAL_ENV``/``PYTHONPATH``. The README's own activation line comes first, as a newcomer types it.
They run in a scratch clone (:func:`conftest.make_project`, plus ``.venv`` linking to this checkout's
environment, the ``Makefile``, and the release record: ``manifests/``, ``reports/``, ``dvc.lock``), never in
the repository itself. The record pins the code it was made from: where the checkout has moved on, the
scratch clone gets the pinned bytes from git history (what ``flowpin rebuild`` does), so verifying the
record does not depend on whether it was regenerated after the last code change. The flow's outputs
(``data/``, ``runs/``) are hard-linked in from the checkout when ``make run`` (or ``dvc pull``) made them; on
a fresh clone (CI) the commands that read them are skipped, saying so. A sweep fixture (two jobs of a
probe stage, ``tests/test_sweep.py``) stands in for a training sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowpin.hashing import hash_bytes, hash_file
from flowpin.manifest.statement import load_manifest
from flowpin.replay.rebuild import GitHistory, pinned_code
from helpers import PROBE_RECIPE, PROBE_STAGE, REPO, checked, flowpin_commands, make_project

ACTIVATE = "source .venv/bin/activate"
"""The README's activation step, right after the two commands: the only set-up before every command here."""

SKIPPED: dict[str, str] = {
    "make run": "installs, then replays all 17 stages with dvc repro (about 10 minutes on 2 cores)",
    "make test": "the test suite this test is part of",
    "make release-check": "re-runs every stage in a scratch workspace (flowpin rebuild --all)",
    "FLOWPIN_STALE_CHECKPOINTS=archive dvc repro pretrain": "trains pretrain (dvc repro)",
    "FLOWPIN_STALE_CHECKPOINTS=discard dvc repro pretrain": "trains pretrain (dvc repro)",
    "flowpin fork manifests/pretrain.json --step 100 train.loop.optim.schedule.peak_lr=1e-3": "trains a fork",
    "python stages/train.py -m hydra/launcher=joblib model=tiny,tiny_wide "
    "train.loop.optim.schedule.peak_lr=1e-3,3e-4": "trains four models (a Hydra sweep)",
    "dvc exp run -S 'params/pretrain.yaml:train.loop.steps=20' pretrain": "trains pretrain (a DVC experiment)",
}
"""README commands too heavy to run here, by exact text, and why."""


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a README command run here must give."""

    status: int = 0
    """The exit status the command must end with."""
    prints: str = ""
    """Text its stdout must contain."""
    needs_outputs: bool = False
    """It reads the flow's outputs (data/, runs/): skipped where `make run` has not made them."""


RUN: dict[str, Expect] = {
    "flowpin --help": Expect(prints="usage: flowpin"),
    "dvc status": Expect(),
    "flowpin verify manifests/*.json": Expect(prints="17 verified, 0 failed", needs_outputs=True),
    "flowpin show manifests/pretrain.json": Expect(prints="signature  VERIFIED"),
    "flowpin lineage manifests/eval.json": Expect(prints="manifests/ingest.json [ingest] VERIFIED"),
    "flowpin diff manifests/midtrain.json manifests/longctx.json": Expect(status=1, prints="outputs differ in 1"),
    "flowpin batch manifests/pretrain.json --step 3": Expect(needs_outputs=True),
    "flowpin batch runs/pretrain/checkpoints/step-000050 --step 3 --json": Expect(needs_outputs=True),
    "flowpin batch manifests/pretrain.json --step 3 --world-size 4 --rank 1": Expect(needs_outputs=True),
    "flowpin batch data/tokenize --step 2 --order-seed 7 --batch-size 4": Expect(needs_outputs=True),
    'flowpin sweep "$(ls -d multirun/*/* | tail -1)"': Expect(prints="2 job(s) of 2 planned: 2 ok"),
    "flowpin exp --dry-run pretrain train.loop.steps=20": Expect(
        prints="dvc exp run --set-param params/pretrain.yaml:train.loop.steps=20 pretrain"
    ),
}
"""README commands run here, by exact text (after the activation step), and what each must give."""

SHELL_BLOCKS = ("bash", "sh", "shell", "console")


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` that starts a word outside quotes, to the end."""
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The commands of the shell blocks of ``text``, in order, as typed (comments and prompts stripped; a
    line ending in a backslash joined with the next)."""
    commands: list[str] = []
    lang: str | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            continue
        if lang not in SHELL_BLOCKS:
            continue
        if lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        command = strip_comment(line)
        if command.endswith("\\"):
            pending += command[:-1].rstrip() + " "
            continue
        command, pending = (pending + command).strip(), ""
        if command:
            commands.append(command)
    return commands


COMMANDS = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))


def fresh_shell(
    root: Path, script: str, *, activate: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``script`` in a new bash in ``root`` with nothing inherited, after the README's activation step."""
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", "-c", f"{ACTIVATE} && {script}" if activate else script],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"},
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def _pinned(data: bytes, *, algorithm: str, digest: str) -> bool:
    return hash_bytes(data, algorithm) == digest


def pin_recorded_code(root: Path) -> int:
    """Put every code/config file the record pins at its pinned bytes (from git history where the checkout
    differs); returns how many files were taken from history."""
    git = GitHistory(REPO)
    restored = 0
    for path in sorted((root / "manifests").glob("*.json")):
        m = load_manifest(path)
        for name, digest in pinned_code(m).items():
            target = root / name
            if target.is_file() and hash_file(target, m.algorithm) == digest:
                continue
            accept = functools.partial(_pinned, algorithm=m.algorithm, digest=digest)
            found = git.find(name, m.git.get("commit"), accept)
            if found is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(found[1])
                restored += 1
    return restored


def flow_outputs_present() -> bool:
    """Whether this checkout holds every output the release record pins (after `make run` or `dvc pull`)."""
    names = {s["name"] for path in (REPO / "manifests").glob("*.json") for s in load_manifest(path).subjects}
    return bool(names) and all((REPO / name).exists() for name in names)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # read-only use: the bytes are shared, never written
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


@dataclasses.dataclass(frozen=True)
class Clone:
    """The scratch clone the README's commands run in."""

    root: Path
    outputs: bool
    """Whether the flow's outputs are there (linked from this checkout)."""


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Clone:
    """A scratch clone with the release record, the environment, a probe sweep and (if made) the outputs."""
    root = make_project(tmp_path_factory.mktemp("readme") / "clone")
    (root / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy2(REPO / "dvc.lock", root / "dvc.lock")
    for name in ("manifests", "reports"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("full"), dirs_exist_ok=True)
    pin_recorded_code(root)
    outputs = flow_outputs_present()
    if outputs:
        for name in ("data", "runs"):
            shutil.copytree(REPO / name, root / name, copy_function=_link_or_copy, dirs_exist_ok=True)
    (root / "params" / "probe.yaml").write_text(PROBE_RECIPE)
    (root / "stages" / "probe.py").write_text(PROBE_STAGE)
    checked(root, sys.executable, "stages/probe.py", "-m", "probe.lr=0.1,0.2")  # multirun/<date>/<time>-<id>/
    return Clone(root=root, outputs=outputs)


def test_shell_blocks_are_read_as_typed() -> None:
    text = """
```bash
make run    # a comment
flowpin sweep "$(ls -d a/* | tail -1)"   # quoted: "#" stays, the comment goes
echo '# not a comment' x#y \\
  --flag
```
```python
print("not shell")
```
```
a diagram, not shell
```
```console
$ dvc status
Data and pipelines are up to date.
```
"""
    assert readme_commands(text) == [
        "make run",
        'flowpin sweep "$(ls -d a/* | tail -1)"',
        "echo '# not a comment' x#y --flag",
        "dvc status",
    ]


def test_every_readme_command_is_run_here_or_skipped_by_name() -> None:
    assert COMMANDS[:3] == ["make run", "make test", ACTIVATE]  # the activation step right after the two
    unclassified = [c for c in COMMANDS if c != ACTIVATE and c not in RUN and c not in SKIPPED]
    assert unclassified == [], "add each to RUN (cheap: say what it must give) or SKIPPED (say why)"
    stale = sorted(c for c in (*RUN, *SKIPPED) if c not in COMMANDS)
    assert stale == [], "no longer in the README: remove from RUN/SKIPPED"
    assert not set(RUN) & set(SKIPPED)


@pytest.mark.parametrize("command", [c for c in dict.fromkeys(COMMANDS) if c != ACTIVATE])
def test_readme_command_works_as_typed(clone: Clone, command: str) -> None:
    if command in SKIPPED:
        pytest.skip(f"skipped by name: {SKIPPED[command]}")
    expect = RUN[command]
    if expect.needs_outputs and not clone.outputs:
        pytest.skip("needs the flow's outputs (data/, runs/), which this checkout lacks: make run or dvc pull")
    proc = fresh_shell(clone.root, command)
    said = f"$ {command}\n(exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == expect.status, said
    assert expect.prints in proc.stdout, said


def test_the_environment_holds_every_tool_the_readme_types(clone: Clone) -> None:
    """`dvc repro` runs dvc.yaml's `python stages/<x>.py`: that python, and dvc, flowpin, torchrun, are the venv's."""
    proc = fresh_shell(
        clone.root,
        'echo "VIRTUAL_ENV=$VIRTUAL_ENV"; for t in python dvc flowpin torchrun; do command -v "$t"; done; '
        "python -c 'import hydra, flowpin, sys; print(\"prefix=\" + sys.prefix)' && python stages/ingest.py --help",
    )
    assert proc.returncode == 0, proc.stderr
    venv = re.search(r"^VIRTUAL_ENV=(.+)$", proc.stdout, re.M)
    assert venv is not None and Path(venv[1]).resolve() == (REPO / ".venv").resolve()
    tools = [line for line in proc.stdout.splitlines() if line.endswith(("/python", "/dvc", "/flowpin", "/torchrun"))]
    assert tools == [f"{venv[1]}/bin/{t}" for t in ("python", "dvc", "flowpin", "torchrun")]
    assert f"prefix={venv[1]}" in proc.stdout
    assert "== Config ==" in proc.stdout or "Powered by Hydra" in proc.stdout  # the stage's Hydra help


def test_every_flowpin_command_has_a_working_help(clone: Clone) -> None:
    commands = sorted(" ".join(path) for path in flowpin_commands() if path)
    loop = " ".join(f"'{c}'" for c in commands)
    proc = fresh_shell(clone.root, f'for c in {loop}; do flowpin $c --help >/dev/null 2>&1 || echo "FAILED: $c"; done')
    assert proc.returncode == 0 and "FAILED" not in proc.stdout, proc.stdout + proc.stderr
    assert {"diff", "key init", "model-sign verify", "release import"} <= set(commands)  # the walk sees them


def test_make_shell_opens_a_shell_inside_the_environment(clone: Clone) -> None:
    """The README's other way in: `make shell`; commands piped to its interactive shell run in the venv."""
    assert "`make shell`" in (REPO / "README.md").read_text(encoding="utf-8")
    proc = fresh_shell(
        clone.root,
        "SHELL=/bin/bash make -s -o .venv/.installed shell",
        activate=False,
        stdin='echo "VIRTUAL_ENV=$VIRTUAL_ENV"; command -v python; exit\n',
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv = re.search(r"^VIRTUAL_ENV=(.+)$", proc.stdout, re.M)
    assert venv is not None and Path(venv[1]).resolve() == (REPO / ".venv").resolve()
    assert f"{venv[1]}/bin/python" in proc.stdout.splitlines()
