"""Hostile *files*: a FIFO, a device, a directory or a symlink where flowpin expects a regular file, JSON
that Python's parser accepts but a strict reader must not (repeated keys, NaN, deep nesting), and batch
requests that would allocate without bound (issue #13, items 4, 8 and 11).

Every case that could hang or exhaust memory before the fix runs in a child process with a timeout and
a data-size limit (``run``), so a regression fails the case instead of hanging the suite. Each case
asserts the named error, a message that says where and how to fix, and that nothing on disk changed.
Unit tests of the two readers (:mod:`flowpin.safeio`, :mod:`flowpin.jsonio`) come last.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from flowpin.canonical import canonical_json
from flowpin.constants import CHECKPOINTS_DIR, INDEX_NAME, MANIFEST_DIR
from flowpin.data.shards import write_dataset
from flowpin.data.tokenize import TokenizeConfig, run_tokenize
from flowpin.errors import (
    ArtifactUnreadableError,
    DataOrderError,
    FileTooLargeError,
    JSONDuplicateKeyError,
    JSONEncodingError,
    JSONNonFiniteError,
    JSONSyntaxError,
    JSONTooDeepError,
    JSONTooLargeError,
    NotAReleaseError,
    NotRegularFileError,
    ShardError,
)
from flowpin.jsonio import loads_strict
from flowpin.modelsign import init_key as init_model_key
from flowpin.recipe import to_config
from flowpin.replay.release import RELEASE_FILE, RELEASE_PAYLOAD_TYPE, import_release
from flowpin.safeio import open_regular, read_regular
from flowpin.train.checkpoint import load_checkpoint, save_checkpoint
from helpers import Project, one_step_state

REPO = Path(__file__).resolve().parents[1]
FLOWPIN = str(Path(sys.executable).parent / "flowpin")
TIMEOUT = 20
"""Seconds a case may take; before the fix the FIFO cases never end."""
DATA_LIMIT = 4 << 30
"""Data-segment limit of the child: before the fix /dev/zero grows a buffer until memory runs out."""
CKPT_FIX = "restore it or resume from an earlier checkpoint"


# --- harness --------------------------------------------------------------------------------------


def snapshot(base: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every entry under ``base`` by kind and mode; regular files with their bytes. Nothing but regular
    files is ever opened (a FIFO would block), and symlinks are recorded by target."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(base).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", st.st_mode, os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_mode, path.read_bytes())
            else:
                out[rel] = ("other", st.st_mode, b"")
    return out


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))


def run(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` in a child (``FLOWPIN_ROOT=cwd``) that may neither outlive :data:`TIMEOUT` nor grow past
    :data:`DATA_LIMIT`; a hang fails the test instead of the suite."""
    env = {**os.environ, "FLOWPIN_ROOT": str(cwd), "DVC_NO_ANALYTICS": "1"}
    env.pop("FLOWPIN_SIGNING_KEY", None)
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(argv)}` hung: still running after {TIMEOUT} s")


def refused(proc: subprocess.CompletedProcess[str], error: type[Exception], *phrases: str, status: int = 2) -> str:
    """The command failed with ``status``, named ``error``, printed no traceback and said every phrase."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == status, out
    assert "Traceback" not in out, out
    assert f"{error.__name__}: " in out, out
    for phrase in phrases:
        assert phrase in out, f"{phrase!r} missing from: {out}"
    return out


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def symlink(path: Path, target: str | Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


# --- manifests: verify, show, diff ------------------------------------------------------------------

MANIFEST_KINDS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "fifo": ("FIFO", lambda m: fifo(m)),
    "dev-zero": ("character device", lambda m: symlink(m, "/dev/zero")),
    "directory": ("directory", lambda m: m.mkdir(parents=True)),
    "symlink-to-fifo": ("FIFO", lambda m: symlink(m, fifo(m.with_name("pipe")))),
}


def hostile_manifest(project: Project, kind: str) -> tuple[Path, str]:
    """A recorded project whose ``manifests/evil.json`` is ``kind``; returns it and the word that names it."""
    project.record_stage("train")
    words, make = MANIFEST_KINDS[kind]
    path = project.root / MANIFEST_DIR / "evil.json"
    make(path)
    return path, words


@pytest.mark.parametrize("kind", list(MANIFEST_KINDS))
def test_verify_refuses_a_manifest_that_is_not_a_regular_file(project: Project, kind: str) -> None:
    path, words = hostile_manifest(project, kind)
    before = snapshot(project.root)
    proc = run(project.root, FLOWPIN, "verify", str(path))
    refused(proc, NotRegularFileError, str(path), words, "not a regular file", "name a manifest file", status=1)
    assert snapshot(project.root) == before


@pytest.mark.parametrize("kind", list(MANIFEST_KINDS))
def test_show_refuses_a_manifest_that_is_not_a_regular_file(project: Project, kind: str) -> None:
    path, words = hostile_manifest(project, kind)
    before = snapshot(project.root)
    proc = run(project.root, FLOWPIN, "show", str(path))
    refused(proc, NotRegularFileError, str(path), words, "name a manifest file")
    assert snapshot(project.root) == before


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "symlink-to-fifo"])  # two directories: a tree diff
def test_diff_refuses_a_manifest_that_is_not_a_regular_file(project: Project, kind: str) -> None:
    path, words = hostile_manifest(project, kind)
    good = project.manifest_path("train")
    before = snapshot(project.root)
    proc = run(project.root, FLOWPIN, "diff", str(good), str(path))
    refused(proc, NotRegularFileError, str(path), words, "name a manifest file")
    assert snapshot(project.root) == before


# --- checkpoints: load/resume and model-sign sign -----------------------------------------------------

LOAD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from torch import nn
    from flowpin.errors import FlowpinError
    from flowpin.train.checkpoint import load_checkpoint
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        load_checkpoint(Path(sys.argv[1]), model=model, optimizer=opt, restore_rng_state=False)
    except FlowpinError as exc:
        print(f"flowpin: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
    """
)


def saved_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(path, one_step_state(model, opt, torch.ones(2, 4)), model=model, optimizer=opt)
    return path


TENSOR_KINDS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "fifo": ("FIFO", lambda p: fifo(p)),
    "dev-zero": ("character device", lambda p: symlink(p, "/dev/zero")),
}


@pytest.mark.parametrize("kind", list(TENSOR_KINDS))
def test_resume_refuses_a_tensor_file_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    ck = saved_checkpoint(tmp_path / "run" / CHECKPOINTS_DIR / "step-000001")
    target = ck / "model.safetensors"
    target.unlink()
    words, make = TENSOR_KINDS[kind]
    make(target)
    before = snapshot(tmp_path)
    proc = run(tmp_path, sys.executable, "-c", LOAD, str(ck))
    refused(proc, NotRegularFileError, str(target), words, CKPT_FIX)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", list(TENSOR_KINDS))
def test_model_sign_refuses_a_tensor_file_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "proj"
    (root / ".dvc").mkdir(parents=True)
    init_model_key(root)
    ck = saved_checkpoint(root / "runs" / "tiny" / CHECKPOINTS_DIR / "step-000001")
    target = ck / "optimizer.safetensors"
    target.unlink()
    words, make = TENSOR_KINDS[kind]
    make(target)
    before = snapshot(tmp_path)
    proc = run(root, FLOWPIN, "model-sign", "sign", str(ck))
    refused(proc, NotRegularFileError, str(target), words, CKPT_FIX)
    assert snapshot(tmp_path) == before
    assert not (root / "runs" / "tiny" / "model-signatures").exists()


def _checkpoint_with_state(tmp_path: Path, edit: str) -> tuple[Path, Callable[[], object]]:
    """A saved checkpoint whose state.json is rewritten by ``edit`` (``"nan"`` or ``"duplicate"``)."""
    ck = saved_checkpoint(tmp_path / "step-000001")
    state = ck / "state.json"
    text = state.read_text()
    if edit == "nan":
        doc = json.loads(text)
        text = text.replace(f'"lr":{json.dumps(doc["lr"])}', '"lr":NaN', 1)
        assert '"lr":NaN' in text
    else:  # Python keeps the last "step"; a reader that keeps the first would resume at step 7
        text = '{"step":7,' + text[1:]
    state.write_text(text)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    return state, lambda: load_checkpoint(
        ck, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=1e-3), restore_rng_state=False
    )


@pytest.mark.parametrize(("edit", "cause"), [("nan", JSONNonFiniteError), ("duplicate", JSONDuplicateKeyError)])
def test_state_json_with_nan_or_a_repeated_key_is_refused(tmp_path: Path, edit: str, cause: type[Exception]) -> None:
    state, load = _checkpoint_with_state(tmp_path, edit)
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactUnreadableError) as info:
        load()
    assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
    assert str(state) in str(info.value) and CKPT_FIX in str(info.value)
    assert snapshot(tmp_path) == before


# --- releases -----------------------------------------------------------------------------------------


def test_release_import_refuses_a_fifo_release_json(tmp_path: Path) -> None:
    root = tmp_path / "clone"
    (root / ".dvc").mkdir(parents=True)
    release = tmp_path / "release"
    path = fifo(release / RELEASE_FILE)
    before = snapshot(tmp_path)
    proc = run(root, FLOWPIN, "release", "import", str(release))
    refused(proc, NotRegularFileError, str(path), "FIFO", "get it again from the exporting lab")
    assert snapshot(tmp_path) == before


RELEASE_JSON = {
    "duplicate-key": (
        b'{"payload": "e30=", "payloadType": "text/plain", "payloadType": "%s", "signatures": []}',
        JSONDuplicateKeyError,
        "repeats the key 'payloadType'",
    ),
    "nan": (
        b'{"payload": "e30=", "payloadType": "%s", "signatures": [], "x": NaN}',
        JSONNonFiniteError,
        "NaN",
    ),
}


@pytest.mark.parametrize("case", list(RELEASE_JSON))
def test_release_json_with_a_repeated_key_or_nan_is_refused(tmp_path: Path, case: str) -> None:
    template, cause, phrase = RELEASE_JSON[case]
    root = tmp_path / "clone"
    (root / ".dvc").mkdir(parents=True)
    release = tmp_path / "release"
    release.mkdir()
    (release / RELEASE_FILE).write_bytes(template % RELEASE_PAYLOAD_TYPE.encode())
    before = snapshot(tmp_path)
    with pytest.raises(NotAReleaseError) as info:
        import_release(root, release)
    assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
    message = str(info.value)
    assert str(release / RELEASE_FILE) in message and phrase in message, message
    assert "get it again from the exporting lab" in message, message
    assert snapshot(tmp_path) == before


# --- flowpin batch --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real tokenized dataset (trained BPE, 32-token sequences) to copy into projects."""
    base = tmp_path_factory.mktemp("tokenized")
    records = [{"id": f"d{i}", "text": f"def f{i}(x):\n    return x * {i}\n" * 8} for i in range(40)]
    write_dataset(records, base / "corpus", docs_per_shard=16, level=3)
    recipe = {
        "tokenizer": {"vocab_size": 300, "min_frequency": 2, "special_tokens": ["<|endoftext|>", "<|pad|>"], "seed": 1},
        "packing": {"seq_len": 32, "tail": "pad"},
        "shards": {"sequences_per_shard": 40, "zstd_level": 3},
    }
    out = base / "tok"
    out.mkdir()
    run_tokenize(to_config(TokenizeConfig, recipe, where="tokenize"), base / "corpus", out)
    return out


def batch_project(tmp_path: Path, data: Path | None) -> Path:
    """A project root with the repository's recipes and, if given, ``data`` as data/tokenize."""
    root = tmp_path / "proj"
    (root / ".dvc").mkdir(parents=True)
    shutil.copytree(REPO / "params", root / "params")
    if data is not None:
        shutil.copytree(data, root / "data" / "tokenize")
    return root


def test_batch_refuses_a_deeply_nested_index_json(tmp_path: Path, tokenized: Path) -> None:
    root = batch_project(tmp_path, tokenized)
    index = root / "data" / "tokenize" / INDEX_NAME
    index.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    before = snapshot(tmp_path)
    proc = run(root, FLOWPIN, "batch", "params/tokenize.yaml", "--step", "0", "--order-seed", "1", "--batch-size", "4")
    refused(proc, ShardError, str(index), "nested more than", "rerun the tokenize stage")
    assert snapshot(tmp_path) == before


def test_batch_refuses_a_huge_batch_size_before_allocating(tmp_path: Path, tokenized: Path) -> None:
    root = batch_project(tmp_path, tokenized)
    before = snapshot(tmp_path)
    proc = run(
        root, FLOWPIN, "batch", "params/tokenize.yaml", "--step", "7", "--order-seed", "1", "--batch-size", "20000000"
    )
    refused(proc, DataOrderError, "--batch-size", "20000000", "pass a batch size of at most 524288")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(("--step", "-1"), "--step"), (("--step", "0", "--batch-size", "0"), "--batch-size")],
    ids=["negative-step", "zero-batch-size"],
)
def test_batch_refuses_a_negative_step_or_empty_batch_before_reading_anything(
    tmp_path: Path, argv: tuple[str, ...], flag: str
) -> None:
    root = batch_project(tmp_path, None)  # no dataset at all: the arguments are refused first
    before = snapshot(tmp_path)
    proc = run(root, FLOWPIN, "batch", "params/tokenize.yaml", *argv)
    refused(proc, DataOrderError, flag, "pass a value of")
    assert snapshot(tmp_path) == before


# --- the readers themselves --------------------------------------------------------------------------


def test_read_regular_names_each_kind_of_non_regular_file(tmp_path: Path) -> None:
    cases = {
        "a FIFO": fifo(tmp_path / "pipe"),
        "a character device": Path("/dev/zero"),
        "a directory": tmp_path,
    }
    server = socket.socket(socket.AF_UNIX)
    sock = tmp_path / "sock"
    server.bind(str(sock))
    cases["a socket"] = sock
    try:
        for words, path in cases.items():
            with pytest.raises(NotRegularFileError, match=words) as info:
                read_regular(path, max_bytes=1 << 20, what="manifest")
            assert str(path) in str(info.value) and "not a regular file" in str(info.value)
    finally:
        server.close()


def test_read_regular_no_follow_refuses_a_symlink_and_follow_reads_through_it(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_bytes(b"{}")
    link = symlink(tmp_path / "link.json", real)
    assert read_regular(link, max_bytes=10, what="file") == b"{}"
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        read_regular(link, max_bytes=10, what="release file", follow_symlinks=False)


def test_read_regular_bounds_the_size(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 11)
    assert read_regular(path, max_bytes=11, what="file") == b"x" * 11
    with pytest.raises(FileTooLargeError, match="is 11 bytes, more than any such file flowpin reads"):
        read_regular(path, max_bytes=10, what="file")


def test_open_regular_yields_a_blocking_descriptor(tmp_path: Path) -> None:
    import fcntl

    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with open_regular(path, max_bytes=None, what="file") as f:
        assert f.size == 3 and not fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert f.read_all() == b"abc"


@pytest.mark.parametrize(
    ("data", "error", "phrase"),
    [
        (b'{"a": 1, "a": 2}', JSONDuplicateKeyError, "repeats the key 'a'"),
        (b'{"a": {"b": [1, {"c": 1, "c": 1}]}}', JSONDuplicateKeyError, "repeats the key 'c'"),
        (b"[NaN]", JSONNonFiniteError, "NaN"),
        (b"[-Infinity]", JSONNonFiniteError, "Infinity"),
        (b"[1e999]", JSONNonFiniteError, "1e999"),
        (b"[" * 65 + b"]" * 65, JSONTooDeepError, "nested more than 64"),
        (b"[" * 100_000 + b"]" * 100_000, JSONTooDeepError, "nested more than 64"),
        (b'{"a": ', JSONSyntaxError, "truncated?"),
        (b"\xff{}", JSONEncodingError, "not UTF-8"),
        (b"1" * 5000, JSONSyntaxError, "4300"),
        (b" " * 1025, JSONTooLargeError, "1025 bytes"),
    ],
    ids=[
        "duplicate",
        "nested-duplicate",
        "nan",
        "infinity",
        "overflow",
        "depth-65",
        "depth-100000",
        "truncated",
        "not-utf8",
        "huge-int",
        "too-large",
    ],
)
def test_loads_strict_refuses(data: bytes, error: type[Exception], phrase: str) -> None:
    with pytest.raises(error, match=phrase.replace("?", r"\?").replace("[", r"\[")) as info:
        loads_strict(data, where="here.json", max_bytes=1024 if error is JSONTooLargeError else 1 << 20)
    assert str(info.value).startswith("here.json: ")


def test_loads_strict_counts_depth_outside_strings_only() -> None:
    """Brackets inside strings (source code in a record) never count; escaped quotes do not end a string."""
    shallow = {"code": "def f(x): return [[x]] + {1: [2]}[1] " * 40, "q": 'say \\"[[[\\" ' * 30}
    assert loads_strict(canonical_json(shallow), where="x", max_bytes=1 << 20) == shallow
    hidden = b'["\\"]]]]", ' * 70 + b"[" * 65 + b"]" * 65 + b"]" * 70  # 70 + 65 deep behind strings of brackets
    with pytest.raises(JSONTooDeepError, match="nested more than 64"):
        loads_strict(hidden, where="x", max_bytes=1 << 20)


def test_the_string_skipping_pattern_matches_the_plain_one() -> None:
    """jsonio's unrolled string pattern removes exactly what the plain ``"(?:[^"\\]|\\.)*+"`` does."""
    import random
    import re

    from flowpin.jsonio import _STRINGS

    plain = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)
    rng = random.Random(15)
    for _ in range(20_000):
        data = bytes(rng.choice(b'"\\{}[]a\n') for _ in range(rng.randrange(30)))
        assert _STRINGS.sub(b"", data) == plain.sub(b"", data), data


def test_loads_strict_accepts_what_flowpin_writes() -> None:
    value = {"a": [1, 2.5, -0.0, {"b": '[[[{{{\\"', "c": None}], "d": True, "e": "\u00e9"}
    assert loads_strict(canonical_json(value), where="x", max_bytes=1 << 20) == value
    nested: object = 1
    for _ in range(64):
        nested = [nested]
    assert loads_strict(json.dumps(nested).encode(), where="x", max_bytes=1 << 20) == nested
