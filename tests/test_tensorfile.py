"""The strict safetensors header and offsets check (flowpin.tensorfile): one test per rule."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save as np_save
from safetensors.torch import save as torch_save

from flowpin.errors import ArtifactUnreadableError, TensorFileError
from flowpin.tensorfile import MAX_HEADER_BYTES, validate_safetensors

WHERE = "ck/model.safetensors"


def craft(header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file with this header (a dict is dumped as JSON) and data region."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: str = "F32", shape: list[Any] | None = None, offsets: list[Any] | None = None) -> dict[str, Any]:
    shape = [2] if shape is None else shape
    return {"dtype": dtype, "shape": shape, "data_offsets": [0, 8] if offsets is None else offsets}


def refused(data: bytes, *fragments: str) -> TensorFileError:
    with pytest.raises(TensorFileError) as info:
        validate_safetensors(data, where=WHERE, fix="restore it from backup")
    message = str(info.value)
    assert message.startswith(WHERE), message
    assert message.endswith("restore it from backup"), message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# --- what real writers produce is accepted ----------------------------------------------------------


def test_library_output_is_accepted_for_every_common_dtype() -> None:
    tensors = {
        f"t/{dtype}": torch.arange(6).reshape(2, 3).to(dtype)
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)
    }
    tensors["bool"] = torch.tensor([True, False, True])
    tensors["u8"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    data = torch_save(tensors, metadata={"format": "pt"})
    header = validate_safetensors(data, where=WHERE)
    assert set(header.tensors) == set(tensors)
    assert header.metadata == {"format": "pt"}
    assert header.tensors["t/torch.int64"].shape == (2, 3)
    assert header.tensors["scalar"].shape == ()
    assert header.tensors["empty"].begin == header.tensors["empty"].end
    start = header.data_start
    f32 = header.tensors["t/torch.float32"]
    assert np.frombuffer(data[start + f32.begin : start + f32.end], "<f4").tolist() == [0, 1, 2, 3, 4, 5]


def test_numpy_writer_and_an_empty_file_are_accepted() -> None:
    data = np_save({"input_ids": np.zeros((3, 4), np.int32), "doc_index": np.ones((3, 4), np.int32)})
    assert set(validate_safetensors(data, where=WHERE).tensors) == {"input_ids", "doc_index"}
    assert validate_safetensors(craft({}), where=WHERE).tensors == {}


def test_declaration_order_does_not_matter_only_the_tiling() -> None:
    header = {"b": entry(offsets=[8, 16]), "a": entry(offsets=[0, 8])}
    assert set(validate_safetensors(craft(header, bytes(16)), where=WHERE).tensors) == {"a", "b"}


def test_the_error_is_an_unreadable_artifact() -> None:
    assert issubclass(TensorFileError, ArtifactUnreadableError)


# --- the length prefix ----------------------------------------------------------------------------


def test_shorter_than_the_length_prefix() -> None:
    refused(b"\x01\x02", "2 bytes, shorter than the 8-byte header length")


def test_header_length_above_the_cap() -> None:
    refused(craft(b"{}", length=MAX_HEADER_BYTES + 1), f"above the limit of {MAX_HEADER_BYTES}")


def test_header_length_past_the_end_of_the_file() -> None:
    refused(craft(b"{}", length=1000), "header length 1000 runs past the end of the file (2 bytes")


# --- the header JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'  {"a": 1}', "does not start with '{'"),
        (b"[1, 2]", "does not start with '{'"),
        (b'{"\xff": 1}', "not UTF-8"),
        (b'{"a": ', "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": Infinity}', "not valid JSON"),
    ],
    ids=["leading-space", "array", "not-utf8", "truncated", "nan", "infinity"],
)
def test_header_must_be_one_utf8_json_object(raw: bytes, fragment: str) -> None:
    refused(craft(raw), fragment)


def test_duplicate_tensor_names_are_refused() -> None:
    one = b'{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    two = b'{"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}'
    raw = b'{"w": ' + one + b', "w": ' + two + b"}"
    refused(craft(raw, bytes(16)), "repeats the key 'w'")


def test_duplicate_keys_inside_an_entry_are_refused() -> None:
    raw = b'{"w": {"dtype": "F32", "dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}'
    refused(craft(raw, bytes(8)), "repeats the key 'dtype'")


@pytest.mark.parametrize("metadata", [{"step": 3}, ["a"], "x", None, {"a": {"b": "c"}}])
def test_metadata_must_map_strings_to_strings(metadata: Any) -> None:
    refused(craft({"__metadata__": metadata}), "__metadata__ must be an object of strings")


# --- each tensor entry ----------------------------------------------------------------------------


def test_entry_must_be_an_object() -> None:
    refused(craft({"w": [0, 8]}), "tensor 'w'", "not an object")


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"dtype": "F32", "shape": [2]}, "missing ['data_offsets']"),
        ({**entry(), "offset": 0}, "unexpected ['offset']"),
    ],
)
def test_entry_has_exactly_dtype_shape_offsets(bad: dict[str, Any], fragment: str) -> None:
    refused(craft({"w": bad}, bytes(8)), "tensor 'w'", fragment)


@pytest.mark.parametrize("dtype", ["F128", "f32", "object", "PICKLE", 4, None, "F8_E8M0"])
def test_unknown_dtype(dtype: Any) -> None:
    refused(craft({"w": entry(dtype=dtype)}, bytes(8)), "tensor 'w'", "is not one of BOOL")


@pytest.mark.parametrize("shape", [[-1], [True, 2], [2.0], "2", [[2]], {"n": 2}])
def test_shape_is_a_list_of_non_negative_ints(shape: Any) -> None:
    refused(craft({"w": entry(shape=shape)}, bytes(8)), "tensor 'w'", "not a list of non-negative integers")


@pytest.mark.parametrize("offsets", [[0], [0, 8, 16], [0.0, 8], [False, 8], [-8, 0], "0-8", [0, None]])
def test_offsets_are_two_non_negative_ints(offsets: Any) -> None:
    refused(craft({"w": entry(offsets=offsets)}, bytes(8)), "tensor 'w'", "is not [begin, end]")


def test_offsets_end_before_begin() -> None:
    refused(craft({"w": entry(offsets=[8, 0])}, bytes(8)), "tensor 'w'", "end before they begin")


@pytest.mark.parametrize(
    ("dtype", "shape", "offsets"), [("F32", [3], [0, 8]), ("F64", [2], [0, 8]), ("I8", [2, 2], [0, 8])]
)
def test_span_must_equal_shape_times_itemsize(dtype: str, shape: list[int], offsets: list[int]) -> None:
    refused(craft({"w": entry(dtype, shape, offsets)}, bytes(8)), "tensor 'w'", "span 8 bytes", "needs")


# --- the tiling of the data region ----------------------------------------------------------------


def test_overlapping_tensors() -> None:
    header = {"a": entry(offsets=[0, 8]), "b": entry(offsets=[4, 12])}
    refused(craft(header, bytes(12)), "tensor 'b'", "overlap the previous tensor (ends at 8)")


def test_two_tensors_on_the_same_bytes() -> None:
    header = {"a": entry(offsets=[0, 8]), "b": entry(offsets=[0, 8])}
    refused(craft(header, bytes(8)), "tensor 'b'", "overlap")


def test_gap_between_tensors() -> None:
    header = {"a": entry(offsets=[0, 8]), "b": entry(offsets=[12, 20])}
    refused(craft(header, bytes(20)), "tensor 'b'", "gap of unused bytes after 8")


def test_first_tensor_not_at_the_start_of_the_data() -> None:
    refused(craft({"a": entry(offsets=[4, 12])}, bytes(12)), "tensor 'a'", "gap of unused bytes after 0")


def test_offsets_past_the_end_of_the_data() -> None:
    refused(craft({"a": entry(offsets=[0, 8])}, bytes(6)), "tensor 'a'", "run past the data region (6 bytes)")


def test_trailing_bytes_after_the_last_tensor() -> None:
    refused(craft({"a": entry(offsets=[0, 8])}, bytes(9)), "1 trailing bytes after the last tensor")


def test_huge_declared_shape_is_a_size_mismatch_not_an_allocation() -> None:
    refused(craft({"a": entry(shape=[2**40, 2**40], offsets=[0, 8])}, bytes(8)), "tensor 'a'", "needs")


# --- every reader is wired ------------------------------------------------------------------------


def test_every_module_that_loads_safetensors_validates_first() -> None:
    """A new ``safetensors`` reader in src/ must call ``validate_safetensors`` before it (checked by import)."""
    import ast
    from pathlib import Path

    readers = {"load", "load_file", "safe_open"}
    loading = []
    for path in sorted((Path(__file__).resolve().parents[1] / "src").rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("safetensors"):
                continue
            if any(a.name in readers for a in node.names):
                loading.append(path)
                names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
                assert "validate_safetensors" in names, f"{path} loads safetensors without validate_safetensors"
    assert {p.name for p in loading} >= {"checkpoint.py", "tokenized.py"}
