"""Tests for flowpin.hashing: file/directory digest rules (hashing/digest.py), .zst content digests, the
stat cache (cache.py), hashing workers chosen by the caller (pool.py), and the Hasher's named errors for
unsafe, missing and unreadable artifacts (hasher.py).

Expected digests are computed here with hashlib/blake3 directly, never by calling flowpin.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard

from flowpin.errors import (
    ArtifactMissingError,
    ArtifactUnreadableError,
    InternalError,
    PathError,
    UnsupportedAlgorithmError,
)
from flowpin.hashing import Hasher, StatCache, parallel_workers, pool
from flowpin.hashing import digest as rules
from flowpin.hashing import hasher as hasher_module
from helpers import make_unreadable

HELLO = b"hello\n"
HELLO_SHA256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
HELLO_BLAKE3 = "8e4c7c1b99dbfd50e7a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99"

TREE = {"b.txt": b"bee\n", "a/c.txt": b"sea\n", "a b/d.txt": b"dee\n", "\u00e9t\u00e9.txt": b"summer\n"}
"""Relative paths chosen so that UTF-8 byte order differs from naive orders ('a b' < 'a/' by 0x20 < 0x2f)."""
TREE_SHA256 = "b155a7dedca8b78b3ddc2a6e5cfcf8eb6b90f5e47c7329031480460a0b81a5f0"


def write_tree(base: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def dir_rule(files: dict[str, bytes], algo: Callable[[bytes], Any] = hashlib.sha256) -> str:
    """The documented directory rule, computed independently of flowpin."""
    lines = sorted((rel.encode("utf-8"), algo(data).hexdigest()) for rel, data in files.items())
    return str(algo(b"".join(d.encode() + b"  " + rel + b"\n" for rel, d in lines)).hexdigest())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = (tmp_path / "repo").resolve()
    r.mkdir()
    return r


# --- golden digests ---------------------------------------------------------------------------------


def test_file_digest_sha256_golden(root: Path) -> None:
    (root / "hello.txt").write_bytes(HELLO)
    d = Hasher(root, workers=1).digest("hello.txt")
    assert hashlib.sha256(HELLO).hexdigest() == HELLO_SHA256
    assert (d.digest, d.kind, d.size, d.algorithm) == (HELLO_SHA256, "file", len(HELLO), "sha256")


def test_file_digest_blake3_golden(root: Path) -> None:
    (root / "hello.txt").write_bytes(HELLO)
    d = Hasher(root, "blake3", workers=1).digest("hello.txt")
    assert blake3.blake3(HELLO).hexdigest() == HELLO_BLAKE3
    assert d.digest == HELLO_BLAKE3


def test_large_file_streams_across_chunks(root: Path) -> None:
    data = os.urandom(rules.CHUNK * 2 + 12345)
    (root / "big.bin").write_bytes(data)
    assert Hasher(root, workers=1).digest("big.bin").digest == hashlib.sha256(data).hexdigest()
    assert Hasher(root, "blake3", workers=1).digest("big.bin").digest == blake3.blake3(data).hexdigest()


def test_unsupported_algorithm_is_refused(root: Path) -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        Hasher(root, "md5")


# --- directory rule ---------------------------------------------------------------------------------


def test_directory_digest_follows_documented_rule(root: Path) -> None:
    write_tree(root / "d", TREE)
    (root / "d" / "empty" / "nested").mkdir(parents=True)  # empty directories do not contribute
    d = Hasher(root, workers=1).digest("d")
    assert d.kind == "directory"
    assert d.digest == dir_rule(TREE) == TREE_SHA256
    assert [f.path for f in d.files] == sorted(TREE, key=lambda p: p.encode("utf-8"))
    assert {f.path: f.digest for f in d.files} == {p: hashlib.sha256(b).hexdigest() for p, b in TREE.items()}
    assert d.size == sum(len(b) for b in TREE.values())


def test_directory_digest_blake3_follows_rule(root: Path) -> None:
    write_tree(root / "d", TREE)
    assert Hasher(root, "blake3", workers=1).digest("d").digest == dir_rule(TREE, blake3.blake3)


def test_one_changed_byte_changes_directory_digest(root: Path) -> None:
    write_tree(root / "d", TREE)
    before = Hasher(root, workers=1).digest("d")
    (root / "d" / "a" / "c.txt").write_bytes(b"seA\n")
    after = Hasher(root, workers=1).digest("d")
    assert after.digest != before.digest
    assert after.digest == dir_rule({**TREE, "a/c.txt": b"seA\n"})
    changed = {f.path for f, g in zip(before.files, after.files, strict=True) if f.digest != g.digest}
    assert changed == {"a/c.txt"}


def test_renaming_a_file_changes_directory_digest(root: Path) -> None:
    write_tree(root / "d", TREE)
    before = Hasher(root, workers=1).digest("d").digest
    (root / "d" / "b.txt").rename(root / "d" / "b2.txt")
    after = Hasher(root, workers=1).digest("d").digest
    renamed = {("b2.txt" if k == "b.txt" else k): v for k, v in TREE.items()}
    assert after != before
    assert after == dir_rule(renamed)


# --- .zst files are digested over their content ------------------------------------------------------


def test_zst_digest_is_digest_of_decompressed_content(root: Path) -> None:
    content = b'{"text": "hello"}\n' * 1000
    (root / "s.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(content))
    (root / "s2.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(content))
    h = Hasher(root, workers=1)
    assert h.digest("s.jsonl.zst").digest == hashlib.sha256(content).hexdigest()
    assert h.digest("s2.jsonl.zst").digest == hashlib.sha256(content).hexdigest()  # level-independent


def test_zst_with_several_frames_digests_all_content(root: Path) -> None:
    c = zstandard.ZstdCompressor()
    (root / "multi.zst").write_bytes(c.compress(b"first\n") + c.compress(b"second\n"))
    assert Hasher(root, workers=1).digest("multi.zst").digest == hashlib.sha256(b"first\nsecond\n").hexdigest()


def test_corrupt_zst_is_unreadable(root: Path) -> None:
    (root / "bad.zst").write_bytes(b"this is not zstd data at all")
    with pytest.raises(ArtifactUnreadableError, match=r"bad\.zst"):
        Hasher(root, workers=1).digest("bad.zst")


@pytest.mark.parametrize("keep", [0.5, -5, 4], ids=["half", "all-but-5-bytes", "magic-only"])
def test_truncated_zst_is_unreadable_not_a_shorter_content(root: Path, keep: float) -> None:
    content = os.urandom(200_000) + b"tail " * 50_000
    frame = zstandard.ZstdCompressor(write_checksum=False).compress(content)
    cut = int(len(frame) * keep) if isinstance(keep, float) else keep if keep > 0 else len(frame) + keep
    (root / "t.zst").write_bytes(frame[:cut])
    with pytest.raises(ArtifactUnreadableError, match=r"t\.zst"):
        Hasher(root, workers=1).digest("t.zst")


# --- stat cache ---------------------------------------------------------------------------------------


def _hash_as_if_later(monkeypatch: pytest.MonkeyPatch, seconds: float = 10.0) -> None:
    """Make the hasher believe it runs ``seconds`` after now, i.e. the files are not 'racy' any more.

    Setting mtime into the past is not enough: utime() itself updates ctime, and the racy check uses
    max(mtime, ctime).
    """
    real = time.time_ns
    monkeypatch.setattr(
        hasher_module,
        "time",
        types.SimpleNamespace(time_ns=lambda: real() + int(seconds * 1e9), perf_counter=time.perf_counter),
    )


def _no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError(f"file was read although the stat cache should have answered: {args}")

    monkeypatch.setattr(pool, "hash_file_digests", refuse)


def test_cache_answers_unchanged_files_without_reading(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(root / "d", TREE)
    _hash_as_if_later(monkeypatch)
    cache = StatCache(tmp_path / "cache" / "digests.sqlite")
    first = Hasher(root, cache=cache, workers=1)
    a = first.digest_all(["d"])
    assert (first.stats.files, first.stats.cache_hits) == (len(TREE), 0)

    _no_reads(monkeypatch)
    second = Hasher(root, cache=cache, workers=1)
    b = second.digest_all(["d"])
    assert (second.stats.files, second.stats.bytes_read, second.stats.cache_hits) == (0, 0, len(TREE))
    assert a == b
    cache.close()


def test_cache_persists_across_connections(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "f").write_bytes(HELLO)
    _hash_as_if_later(monkeypatch)
    db = tmp_path / "c.sqlite"
    c1 = StatCache(db)
    Hasher(root, cache=c1, workers=1).digest("f")
    c1.close()
    c2 = StatCache(db)
    h = Hasher(root, cache=c2, workers=1)
    assert h.digest("f").digest == HELLO_SHA256
    assert h.stats.cache_hits == 1
    c2.close()


def test_recently_modified_files_are_not_cached(root: Path, tmp_path: Path) -> None:
    (root / "f").write_bytes(HELLO)
    cache = StatCache(tmp_path / "c.sqlite")
    Hasher(root, cache=cache, workers=1).digest("f")
    again = Hasher(root, cache=cache, workers=1)
    again.digest("f")
    # written just now (inside RACY_WINDOW_NS): a same-tick rewrite could be missed, so it is re-read
    assert (again.stats.files, again.stats.cache_hits) == (1, 0)
    cache.close()


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_same_size_modification_invalidates_cache(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_mtime: bool
) -> None:
    path = root / "f"
    path.write_bytes(HELLO)
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    _hash_as_if_later(monkeypatch)
    cache = StatCache(tmp_path / "c.sqlite")
    Hasher(root, cache=cache, workers=1).digest("f")
    time.sleep(0.05)  # let the (coarse, jiffy-grained) ctime clock move on
    path.write_bytes(b"HELLO\n")  # same size
    if restore_mtime:
        os.utime(path, ns=(old, old))
        assert path.stat().st_mtime_ns == old
    h = Hasher(root, cache=cache, workers=1)
    assert h.digest("f").digest == hashlib.sha256(b"HELLO\n").hexdigest()
    assert (h.stats.files, h.stats.cache_hits) == (1, 0)
    cache.close()


# --- parallel hashing ---------------------------------------------------------------------------------


def test_parallel_matches_serial(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"part-{i // 10}/f{i:03d}.txt": f"file {i}\n".encode() * (i + 1) for i in range(200)}
    write_tree(root / "d", files)
    (root / "d" / "z.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zipped\n"))
    files["z.zst"] = b"zipped\n"
    assert len(files) > pool.PARALLEL_MIN_FILES

    pid_log = tmp_path / "pids"
    real_hash_file = rules.hash_file_digests

    def logging_hash_file(path: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
        fd = os.open(pid_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return real_hash_file(path, *args, **kwargs)

    monkeypatch.setattr(pool, "hash_file_digests", logging_hash_file)
    serial = Hasher(root, workers=1).digest("d")
    assert set(pid_log.read_text().split()) == {str(os.getpid())}
    pid_log.unlink()
    parallel = Hasher(root, workers=2).digest("d")
    pids = pid_log.read_text().split()
    assert len(pids) == len(files)
    assert set(pids) - {str(os.getpid())}, "no file was hashed in another process"
    assert parallel == serial
    assert serial.digest == dir_rule(files)


def test_parallel_reports_errors_per_file(root: Path) -> None:
    files = {f"f{i:03d}.txt": b"x" * i for i in range(70)}
    write_tree(root / "d", files)
    (root / "d" / "bad.zst").write_bytes(b"garbage")
    result = Hasher(root, workers=2).digest_all(["d"])["d"]
    assert isinstance(result, ArtifactUnreadableError)
    assert "d/bad.zst" in str(result)


def _many_files(root: Path) -> None:
    write_tree(root / "d", {f"f{i:03d}.txt": f"file {i}\n".encode() for i in range(pool.PARALLEL_MIN_FILES + 6)})


def _pids_hashing(monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Log the pid of every process that reads a file (forked workers inherit the patch)."""
    real = rules.hash_file_digests

    def logging(path: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pool, "hash_file_digests", logging)


def test_workers_are_the_callers_choice_not_what_the_process_loaded(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No sniffing: with "torch" loaded, workers=2 still forks, and the default still hashes in-process."""
    _many_files(root)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    log = tmp_path / "pids"
    _pids_hashing(monkeypatch, log)
    parallel = Hasher(root, workers=2).digest("d")
    assert set(log.read_text().split()) - {str(os.getpid())}, "workers=2 hashed nothing in another process"
    log.unlink()
    monkeypatch.delitem(sys.modules, "torch")
    default = Hasher(root).digest("d")  # the library default: this process, whatever the caller loaded
    assert set(log.read_text().split()) == {str(os.getpid())}
    assert default == parallel


def test_fewer_files_than_the_minimum_stay_in_process(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(root / "d", {f"f{i}.txt": b"x" * i for i in range(pool.PARALLEL_MIN_FILES - 1)})
    log = tmp_path / "pids"
    _pids_hashing(monkeypatch, log)
    Hasher(root, workers=4).digest("d")
    assert set(log.read_text().split()) == {str(os.getpid())}


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, None])
def test_workers_must_be_a_positive_count(root: Path, workers: Any) -> None:
    with pytest.raises(InternalError, match="workers"):
        Hasher(root, workers=workers)


def test_parallel_workers_is_every_core() -> None:
    assert parallel_workers() == (os.cpu_count() or 1)


def test_forked_workers_do_not_wait_for_the_parents_blake3_threads(tmp_path: Path) -> None:
    """blake3 hashes a large file on a thread pool; after the parent started it, a forked worker that asked
    the same pool would wait forever for threads fork did not copy. Workers hash blake3 on one thread."""
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from flowpin.hashing import Hasher, digest
        digest.BLAKE3_THREADED_MIN = 1 << 20  # large enough for blake3's thread pool, small for a test
        root = Path({str(tmp_path)!r})
        (root / "big.bin").write_bytes(os.urandom(2 << 20))
        for i in range({pool.PARALLEL_MIN_FILES + 6}):
            (root / "d").mkdir(exist_ok=True)
            (root / "d" / f"f{{i:03d}}").write_bytes(b"x" * i)
        (root / "d" / "zbig.bin").write_bytes(os.urandom(2 << 20))  # in the forked worker's share
        Hasher(root, "blake3").digest("big.bin")  # the parent's thread pool is running now
        print(Hasher(root, "blake3", workers=2).digest("d").digest == Hasher(root, "blake3").digest("d").digest)
        """
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("a forked hashing worker hung on blake3's thread pool")
    assert proc.stdout.split() == ["True"], proc.stderr


# --- unsafe names and symlinks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "", ".", "a\\b"])
def test_unsafe_names_are_refused(root: Path, name: str) -> None:
    (root / "a").mkdir()
    (root / "b").write_bytes(b"b")
    with pytest.raises(PathError):
        Hasher(root, workers=1).digest(name)
    assert isinstance(Hasher(root, workers=1).digest_all([name])[name], PathError)


def test_symlinked_file_escaping_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    (root / "link").symlink_to(outside)
    with pytest.raises(PathError, match="outside the repository"):
        Hasher(root, workers=1).digest("link")


def test_symlinked_directory_escaping_root_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "f").write_bytes(b"secret")
    (root / "dlink").symlink_to(tmp_path / "outdir", target_is_directory=True)
    with pytest.raises(PathError):
        Hasher(root, workers=1).digest("dlink")
    with pytest.raises(PathError):
        Hasher(root, workers=1).digest("dlink/f")


def test_symlink_inside_directory_escaping_root_is_refused(root: Path, tmp_path: Path) -> None:
    write_tree(root / "d", {"ok.txt": b"ok"})
    (tmp_path / "outside.txt").write_bytes(b"secret")
    (root / "d" / "evil").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(PathError, match="d/evil"):
        Hasher(root, workers=1).digest("d")


def test_symlink_to_directory_inside_artifact_is_refused(root: Path) -> None:
    write_tree(root / "d", {"ok.txt": b"ok"})
    write_tree(root / "other", {"x.txt": b"x"})
    (root / "d" / "sub").symlink_to(root / "other", target_is_directory=True)
    with pytest.raises(PathError, match="symlink to a directory"):
        Hasher(root, workers=1).digest("d")


def test_symlink_to_file_inside_root_is_digested_as_its_target(root: Path) -> None:
    write_tree(root / "d", {"ok.txt": b"ok"})
    (root / "target.txt").write_bytes(HELLO)
    (root / "d" / "alias").symlink_to(root / "target.txt")
    d = Hasher(root, workers=1).digest("d")
    assert d.digest == dir_rule({"ok.txt": b"ok", "alias": HELLO})


# --- missing and unreadable artifacts -----------------------------------------------------------------


def test_missing_artifact(root: Path) -> None:
    with pytest.raises(ArtifactMissingError, match="nope"):
        Hasher(root, workers=1).digest("nope/file.bin")


def test_dangling_symlink_is_missing(root: Path) -> None:
    (root / "gone").symlink_to(root / "never-there")
    with pytest.raises(ArtifactMissingError, match="dangling"):
        Hasher(root, workers=1).digest("gone")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def test_unreadable_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(root / "d", {"ok.txt": b"ok", "locked.bin": b"secret"})
    make_unreadable(root / "d" / "locked.bin", monkeypatch)
    with pytest.raises(ArtifactUnreadableError, match=r"d/locked\.bin.*(Permission denied|permission)"):
        Hasher(root, workers=1).digest("d")


def test_unlistable_directory(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(root / "d", {"sub/f.txt": b"f"})
    sub = root / "d" / "sub"
    if _running_as_root():
        real_scandir = os.scandir

        def guarded_scandir(path: Any = ".") -> Any:
            if os.fspath(path) == str(sub):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", guarded_scandir)
    else:
        sub.chmod(0)
    try:
        with pytest.raises(ArtifactUnreadableError, match="d/sub"):
            Hasher(root, workers=1).digest("d")
    finally:
        sub.chmod(0o755)


def test_non_regular_file_is_unreadable(root: Path) -> None:
    (root / "d").mkdir()
    os.mkfifo(root / "d" / "pipe")
    with pytest.raises(ArtifactUnreadableError, match=r"d/pipe.*not a regular file"):
        Hasher(root, workers=1).digest("d")


# --- file sets (inputs outside the repository) --------------------------------------------------------


def test_fileset_digest_follows_directory_rule(root: Path, tmp_path: Path) -> None:
    base = tmp_path / "stdlib-like"
    write_tree(base, TREE)
    d = Hasher(root, workers=1).digest_fileset("lib", base, ["b.txt", "a/c.txt"])
    assert d.kind == "fileset"
    assert d.digest == dir_rule({"b.txt": TREE["b.txt"], "a/c.txt": TREE["a/c.txt"]})


def test_fileset_refuses_escaping_paths(root: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    write_tree(base, {"in.txt": b"in"})
    (tmp_path / "out.txt").write_bytes(b"out")
    (base / "link.txt").symlink_to(tmp_path / "out.txt")
    hasher = Hasher(root, workers=1)
    with pytest.raises(PathError):
        hasher.digest_fileset("lib", base, ["../out.txt"])
    with pytest.raises(PathError):
        hasher.digest_fileset("lib", base, ["link.txt"])


def test_a_fifo_swapped_in_after_the_stat_is_refused_not_read(root: Path) -> None:
    """The per-file hash opens non-blocking and checks the open file: a FIFO never blocks the hasher."""
    fifo = root / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ArtifactUnreadableError, match="not a regular file"):
        rules.hash_file_digests(fifo)


def test_raw_and_content_digests_differ_only_for_zst(root: Path) -> None:
    data = b"content\n" * 100
    (root / "d").mkdir()
    (root / "d" / "plain.txt").write_bytes(data)
    (root / "d" / "packed.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    plain = Hasher(root, workers=1).digest("d/plain.txt")
    packed = Hasher(root, workers=1).digest("d/packed.zst")
    assert plain.digest == plain.raw == hashlib.sha256(data).hexdigest()
    assert packed.digest == plain.digest
    assert packed.raw == hashlib.sha256((root / "d" / "packed.zst").read_bytes()).hexdigest()
    tree = Hasher(root, workers=1).digest("d")
    assert tree.raw != tree.digest  # dirHash is over the bytes, the identity over the content
