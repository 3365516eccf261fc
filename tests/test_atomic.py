"""Tests for flowpin.atomic's file write path: atomic_open (rename over the target) and
atomic_create_exclusive (hard link, never replacing), which share it: content fsynced in a temporary
sibling, the temporary never left behind, an OSError named as a WriteError."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from flowpin.atomic import atomic_create_exclusive, atomic_open, atomic_write_bytes
from flowpin.errors import WriteError


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_open_publishes_with_its_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    with atomic_open(target, mode=0o640) as fh:
        fh.write(b"new")
        assert not target.exists()  # nothing is visible before the block ends
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _siblings(target) == ["f.bin"]


def test_atomic_open_failing_block_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _siblings(target) == ["f.bin"]


def test_create_exclusive_creates_once_and_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "keys" / "k.pem"
    assert atomic_create_exclusive(target, b"first") is True
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert atomic_create_exclusive(target, b"second") is False
    assert target.read_bytes() == b"first"
    assert _siblings(target) == ["k.pem"]


@pytest.mark.parametrize("exists", [False, True])
def test_create_exclusive_without_hard_links_writes_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    target = tmp_path / "k.pem"
    if exists:
        target.write_bytes(b"winner")

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    assert atomic_create_exclusive(target, b"mine", mode=0o600) is (not exists)
    assert target.read_bytes() == (b"winner" if exists else b"mine")
    assert _siblings(target) == ["k.pem"]


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_create_exclusive_failure_is_a_write_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    target = tmp_path / "k.pem"

    def failing_link(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(WriteError, match=r"k\.pem") as info:
        atomic_create_exclusive(target, b"mine")
    assert ("disk is full" in str(info.value)) == (code == errno.ENOSPC)
    assert list(tmp_path.iterdir()) == []
