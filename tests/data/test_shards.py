"""Tests for flowpin.data.shards: deterministic writing, round trips, bounded and strict reading."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import zstandard

from flowpin.canonical import canonical_json
from flowpin.data.shards import read_shard, read_shard_bytes, shard_name, write_shards
from flowpin.errors import InternalError, ShardError

RECORDS: list[dict[str, Any]] = [
    {"id": "a", "text": "plain ascii\n", "n": 1},
    {"id": "b", "text": "line\u2028separator and \u0085 NEL", "nested": {"z": [1, 2.5], "a": None}},
    {"id": "c", "text": "ünïcødé ✓ 🐍", "flag": True},
    {"id": "d", "text": "", "empty": []},
    {"id": "e", "text": "tab\tand\r\nCRLF"},
]


def _write(tmp: Path, records: list[dict[str, Any]] = RECORDS, per: int = 2, level: int = 10) -> Path:
    write_shards(records, tmp, docs_per_shard=per, level=level)
    return tmp


def _frame(tmp: Path, content: bytes, *, content_size: bool = True, name: str = "x.jsonl.zst") -> Path:
    path = tmp / name
    path.write_bytes(zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(content))
    return path


def test_round_trip_and_shard_info(tmp_path: Path) -> None:
    infos = write_shards(iter(RECORDS), tmp_path, docs_per_shard=2, level=10)
    assert [i.name for i in infos] == [
        "shard-00000.jsonl.zst",
        "shard-00001.jsonl.zst",
        "shard-00002.jsonl.zst",
    ]
    assert [i.records for i in infos] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [i.name for i in infos]  # no temporaries left
    read_back: list[dict[str, Any]] = []
    for info, chunk in zip(infos, (RECORDS[0:2], RECORDS[2:4], RECORDS[4:]), strict=True):
        expected = b"".join(canonical_json(r) + b"\n" for r in chunk)
        assert info.uncompressed_bytes == len(expected)
        assert info.sha256 == hashlib.sha256(expected).hexdigest()
        assert read_shard_bytes(tmp_path / info.name) == expected
        read_back.extend(read_shard(tmp_path / info.name, expected_sha256=info.sha256))
    assert read_back == RECORDS


def test_uncompressed_digest_is_pinned(tmp_path: Path) -> None:
    # Golden value: the identity of a shard is its canonical JSONL content, independent of zstd.
    (info,) = write_shards(RECORDS, tmp_path, docs_per_shard=10, level=3)
    assert info.sha256 == "c0e2b63ca653efe7ce78b646de3524d4b1d2ec4349c56cab4a419a74bbcf7afe"
    assert info.to_json() == {
        "name": "shard-00000.jsonl.zst",
        "records": 5,
        "uncompressed_bytes": info.uncompressed_bytes,
        "sha256": info.sha256,
    }


def test_writes_are_byte_identical_and_one_shot(tmp_path: Path) -> None:
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    # The one-shot single-threaded API is what was used (a streaming or threaded writer gives other bytes).
    data = read_shard_bytes(a / names[0])
    cctx = zstandard.ZstdCompressor(level=10, write_content_size=True, write_checksum=True)
    assert (a / names[0]).read_bytes() == cctx.compress(data)
    params = zstandard.get_frame_parameters((a / names[0]).read_bytes())
    assert params.content_size == len(data)


def test_level_changes_bytes_not_identity(tmp_path: Path) -> None:
    big = [{"id": str(i), "text": "the same words again and again " * 20} for i in range(50)]
    (low,) = write_shards(big, tmp_path / "low", docs_per_shard=100, level=1)
    (high,) = write_shards(big, tmp_path / "high", docs_per_shard=100, level=19)
    assert low.sha256 == high.sha256
    assert (tmp_path / "low" / low.name).read_bytes() != (tmp_path / "high" / high.name).read_bytes()


def test_no_records_no_shards(tmp_path: Path) -> None:
    assert write_shards([], tmp_path, docs_per_shard=3, level=3) == []
    assert list(tmp_path.iterdir()) == []


def test_refuses_directory_with_stale_shards(tmp_path: Path) -> None:
    (tmp_path / "shard-00007.jsonl.zst").write_bytes(b"old")
    with pytest.raises(ShardError, match="already holds shards"):
        write_shards(RECORDS, tmp_path, docs_per_shard=2, level=3)


@pytest.mark.parametrize("kwargs", [{"docs_per_shard": 0, "level": 3}, {"docs_per_shard": 1, "level": 23}])
def test_bad_writer_arguments(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(InternalError, match="write_shards: "):
        write_shards(RECORDS, tmp_path, **kwargs)


def test_shard_name_bounds() -> None:
    assert shard_name(12) == "shard-00012.jsonl.zst"
    with pytest.raises(InternalError, match=r"outside 0\.\.99999"):
        shard_name(100_000)


def test_refuses_frame_without_content_size(tmp_path: Path) -> None:
    path = _frame(tmp_path, b'{"a":1}\n', content_size=False)
    with pytest.raises(ShardError, match="does not declare its uncompressed size") as err:
        list(read_shard(path))
    assert str(path) in str(err.value)


def test_refuses_frame_above_the_cap(tmp_path: Path) -> None:
    path = _frame(tmp_path, b'{"a":"' + b"x" * 1000 + b'"}\n')
    with pytest.raises(ShardError, match="above the cap of 100"):
        list(read_shard(path, max_content_size=100))
    assert len(list(read_shard(path, max_content_size=2000))) == 1


def test_refuses_file_larger_than_any_capped_frame(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl.zst"
    path.write_bytes(b"\0" * 300_000)
    with pytest.raises(ShardError, match="larger than any zstd frame"):
        read_shard_bytes(path, max_content_size=1000)


@pytest.mark.parametrize("keep", [3, 20, -12, -1])
def test_truncated_shard(tmp_path: Path, keep: int) -> None:
    (info, *_) = write_shards(RECORDS * 20, tmp_path, docs_per_shard=1000, level=3)
    path = tmp_path / info.name
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ShardError) as err:
        list(read_shard(path))
    assert str(path) in str(err.value)


def test_corrupt_byte_is_detected(tmp_path: Path) -> None:
    (info,) = write_shards(RECORDS * 20, tmp_path, docs_per_shard=1000, level=3)
    path = tmp_path / info.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=re.escape(str(path))):
        list(read_shard(path))


def test_trailing_data_after_frame(tmp_path: Path) -> None:
    (info,) = write_shards(RECORDS, tmp_path, docs_per_shard=10, level=3)
    path = tmp_path / info.name
    path.write_bytes(path.read_bytes() * 2)
    with pytest.raises(ShardError, match="corrupt or truncated"):
        list(read_shard(path))


def test_expected_digest_mismatch(tmp_path: Path) -> None:
    (info,) = write_shards(RECORDS, tmp_path, docs_per_shard=10, level=3)
    with pytest.raises(ShardError, match="expected 0000"):
        list(read_shard(tmp_path / info.name, expected_sha256="0" * 64))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"a":1}\nnot json\n', "line 2 is not UTF-8 JSON"),
        (b'{"a":"\xff"}\n', "line 1 is not UTF-8 JSON"),
        (b'{"a":NaN}\n', "line 1 is not UTF-8 JSON"),
        (b'{"a":1}\n{"id":"x","id":"y"}\n', r"line 2 is not UTF-8 JSON \(an object repeats the key 'id'"),
        (b'{"a":1e999}\n', "line 1 is not UTF-8 JSON .*non-finite number 1e999"),
        (b'{"a":' + b"[" * 65 + b"]" * 65 + b"}\n", "line 1 is not UTF-8 JSON .*nested more than 64"),
        (b"[1,2]\n", "line 1 is a JSON list"),
        (b'{"a":1}\n{"b":2}', "no trailing newline"),
    ],
)
def test_bad_lines(tmp_path: Path, content: bytes, message: str) -> None:
    path = _frame(tmp_path, content)
    with pytest.raises(ShardError, match=message):
        list(read_shard(path))


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="cannot read shard"):
        read_shard_bytes(tmp_path / "nope.jsonl.zst")
