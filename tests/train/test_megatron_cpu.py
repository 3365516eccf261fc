"""flowpin.train.megatron_cpu: each CPU replacement against megatron's own code or its stated semantics."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from megatron.core import tensor_parallel  # type: ignore[import-untyped,unused-ignore]
from megatron.core.fusions import fused_softmax  # type: ignore[import-untyped,unused-ignore]
from megatron.core.models.common.embeddings import (  # type: ignore[import-untyped,unused-ignore]
    RotaryEmbedding,
    YarnRotaryEmbedding,
)
from megatron.core.tensor_parallel import random as mrandom  # type: ignore[import-untyped,unused-ignore]
from megatron.core.transformer import utils as tutils  # type: ignore[import-untyped,unused-ignore]
from megatron.core.utils import GlobalMemoryBuffer  # type: ignore[import-untyped,unused-ignore]

from flowpin.errors import FlowpinError
from flowpin.train import megatron_cpu

NAMES = [p.name for p in megatron_cpu.PATCHES]


@pytest.fixture(autouse=True)
def patched() -> Iterator[None]:
    """Every test here starts with the patches on, and leaves the process as it found it: applying them is an
    entry point's job (``flowpin.runtime.prepare_environment``), so no other test may count on them."""
    before = megatron_cpu.applied()
    megatron_cpu.apply(enabled=True)
    yield
    megatron_cpu.restore()
    if before:
        megatron_cpu.apply(enabled=True)


@pytest.fixture
def unpatched() -> Iterator[None]:
    """megatron's originals for the duration of a test."""
    megatron_cpu.restore()
    yield
    megatron_cpu.apply(enabled=True)


def test_restore_puts_back_only_the_named_patches() -> None:
    assert megatron_cpu.restore(only=NAMES[:2]) == NAMES[:2]
    assert megatron_cpu.applied() == NAMES[2:]
    assert megatron_cpu.restore(only=NAMES[:2]) == []  # already restored
    assert megatron_cpu.apply(enabled=True) == NAMES


@pytest.fixture
def cuda_device_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets megatron's original code run here: its ``.to(torch.cuda.current_device())`` becomes ``.to("cpu")``."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


def seed_streams(seed: int) -> None:
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)


# --- apply / applied / restore -----------------------------------------------------------------------


def test_apply_names_every_patch_and_is_idempotent() -> None:
    assert megatron_cpu.applied() == NAMES
    replaced = tensor_parallel.random.CudaRNGStatesTracker.add
    assert megatron_cpu.apply(enabled=True) == NAMES
    assert tensor_parallel.random.CudaRNGStatesTracker.add is replaced  # not wrapped twice
    assert megatron_cpu.apply(enabled=False) == []
    assert megatron_cpu.apply() == ([] if torch.cuda.is_available() else NAMES)


def test_restore_puts_the_originals_back_and_apply_replaces_them_again() -> None:
    assert megatron_cpu.restore() == NAMES
    assert megatron_cpu.applied() == []
    assert "cuda" in tutils.get_default_causal_mask.__code__.co_consts  # megatron's own device="cuda" version
    assert fused_softmax.get_sliding_window_causal_mask is tutils.get_sliding_window_causal_mask
    megatron_cpu.apply(enabled=True)
    assert fused_softmax.get_default_causal_mask is megatron_cpu._cpu_causal_mask
    assert tutils.get_default_causal_mask is megatron_cpu._cpu_causal_mask
    assert GlobalMemoryBuffer.get_tensor is megatron_cpu._cpu_get_tensor


def test_unreviewed_megatron_code_is_refused_and_nothing_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    megatron_cpu.restore()
    changed = dataclasses.replace(megatron_cpu.PATCHES[-1], reviewed_sha256="0" * 64)
    monkeypatch.setattr(megatron_cpu, "PATCHES", (*megatron_cpu.PATCHES[:-1], changed))
    with pytest.raises(FlowpinError, match=r"_ParamAndGradBuffer\.__init__ is not the code"):
        megatron_cpu.apply(enabled=True)
    assert megatron_cpu.applied() == []  # all-or-nothing
    monkeypatch.undo()
    assert megatron_cpu.apply(enabled=True) == NAMES


# --- RNG tracker ---------------------------------------------------------------------------------------


def draws(seed: int, n: int, *, skip: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    torch.rand(skip, generator=generator)
    return torch.rand(n, generator=generator)


def test_tracker_streams_are_seeded_like_megatron() -> None:
    seed_streams(123)
    states = megatron_cpu.rng_tracker_states()
    assert sorted(states) == ["data-parallel-rng", "expert-parallel-rng", "model-parallel-rng"]
    tracker = tensor_parallel.get_cuda_rng_tracker()
    # megatron's offsets: data = seed, tensor-model-parallel = seed + 2718 + tp_rank, expert = seed + 1024 + ...
    for name, seed in (("data-parallel-rng", 123), ("model-parallel-rng", 123 + 2718), ("expert-parallel-rng", 1147)):
        with tracker.fork(name):
            assert torch.equal(torch.rand(4), draws(seed, 4))


def test_fork_continues_its_stream_and_leaves_the_default_stream_alone() -> None:
    seed_streams(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(99)
    with tracker.fork():
        first = torch.rand(3)
    with tracker.fork():
        second = torch.rand(3)
    assert torch.equal(first, draws(7 + 2718, 3))
    assert torch.equal(second, draws(7 + 2718, 3, skip=3))  # the named stream advanced
    assert torch.equal(torch.rand(5), draws(99, 5))  # the default CPU stream never moved


def test_nested_forks_restore_the_outer_stream() -> None:
    seed_streams(11)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork("data-parallel-rng"):
        a = torch.rand(2)
        with tracker.fork("model-parallel-rng"):
            b = torch.rand(2)
        c = torch.rand(2)
    assert torch.equal(torch.cat([a, c]), draws(11, 4))
    assert torch.equal(b, draws(11 + 2718, 2))


def test_fork_of_an_unknown_stream_and_duplicate_seeds_raise_like_megatron() -> None:
    seed_streams(5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with pytest.raises(Exception, match="is not added"), tracker.fork("no-such-rng"):
        pass
    with pytest.raises(Exception, match="seed 5 already exists"):
        tracker.add("another", 5)


def test_rng_tracker_states_restore_the_same_draws() -> None:
    seed_streams(2024)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        torch.rand(10)
    saved = megatron_cpu.rng_tracker_states()
    with tracker.fork():
        expected = torch.rand(6)
    saved["model-parallel-rng"].add_(0)  # a copy: touching it cannot reach the tracker
    megatron_cpu.set_rng_tracker_states(saved)
    with tracker.fork():
        again = torch.rand(6)
    assert torch.equal(again, expected)
    assert torch.equal(expected, draws(2024 + 2718, 6, skip=10))


def test_set_rng_tracker_states_refuses_foreign_states() -> None:
    seed_streams(1)
    good = megatron_cpu.rng_tracker_states()
    with pytest.raises(FlowpinError, match="different parallel/RNG setup"):
        megatron_cpu.set_rng_tracker_states({"model-parallel-rng": good["model-parallel-rng"]})
    with pytest.raises(FlowpinError, match="1-D uint8"):
        megatron_cpu.set_rng_tracker_states({**good, "data-parallel-rng": torch.zeros(3)})


def test_rng_state_helpers_read_and_write_the_cpu_generator() -> None:
    torch.manual_seed(3)
    state = mrandom._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    first = torch.rand(2)
    mrandom._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(2), first)


# --- memory buffer ---------------------------------------------------------------------------------------


def test_global_memory_buffer_allocates_on_cpu_and_reuses_storage() -> None:
    buffer = GlobalMemoryBuffer()
    big = buffer.get_tensor((4, 6), torch.float32, "mpu")
    assert big.device.type == "cpu" and big.shape == (4, 6) and big.dtype == torch.float32
    small = buffer.get_tensor((2, 3), torch.float32, "mpu")
    assert small.data_ptr() == big.data_ptr()  # the smaller request reuses the buffer
    other = buffer.get_tensor((2, 3), torch.bfloat16, "mpu")
    assert other.data_ptr() != big.data_ptr() and other.dtype == torch.bfloat16
    grown = buffer.get_tensor((10, 10), torch.float32, "mpu")
    assert grown.numel() == 100


def test_global_memory_buffer_matches_megatron_original(unpatched: None, cuda_device_is_cpu: None) -> None:
    original = GlobalMemoryBuffer().get_tensor((3, 5), torch.float32, "x")
    megatron_cpu.apply(enabled=True)
    ours = GlobalMemoryBuffer().get_tensor((3, 5), torch.float32, "x")
    assert (original.shape, original.dtype, original.device) == (ours.shape, ours.dtype, ours.device)


# --- rotary embeddings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_embedding_is_megatrons_computation_bitwise(
    unpatched: None, cuda_device_is_cpu: None, interleaved: bool
) -> None:
    def emb() -> torch.Tensor:
        rope = RotaryEmbedding(
            kv_channels=32, rotary_percent=1.0, rotary_interleaved=interleaved, rotary_base=500000,
            use_cpu_initialization=True,
        )  # fmt: skip
        out: torch.Tensor = rope.get_emb(64, offset=3)
        return out

    original = emb()
    megatron_cpu.apply(enabled=True)
    ours = emb()
    assert ours.device.type == "cpu" and ours.shape == (64, 1, 1, 32)
    assert torch.equal(ours, original)


def test_rope_embedding_formula() -> None:
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    emb = rope.get_emb(5)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    freqs = torch.outer(torch.arange(5, dtype=torch.float32), inv_freq)
    assert torch.equal(emb[:, 0, 0, :], torch.cat([freqs, freqs], dim=-1))


def yarn_embedding(**overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        kv_channels=32, rotary_base=500000.0, use_cpu_initialization=True, scaling_factor=8.0,
        original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return YarnRotaryEmbedding(**kwargs)


def test_yarn_embedding_is_megatrons_computation_bitwise(unpatched: None, cuda_device_is_cpu: None) -> None:
    original, original_mscale = yarn_embedding().get_emb(256)
    megatron_cpu.apply(enabled=True)
    ours, mscale = yarn_embedding().get_emb(256)
    assert ours.device.type == "cpu" and ours.shape == (256, 1, 1, 32)
    assert torch.equal(ours, original)
    assert mscale == original_mscale == pytest.approx(0.1 * torch.log(torch.tensor(8.0)).item() + 1)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones() -> None:
    emb, _ = yarn_embedding(scaling_factor=4.0).get_emb(2)
    rope = RotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=500000.0, use_cpu_initialization=True)
    inv_yarn, inv_rope = emb[1, 0, 0, :16], rope.get_emb(2)[1, 0, 0, :16]  # position 1: the frequencies
    assert torch.equal(inv_yarn[0], inv_rope[0])  # fastest-rotating dimension: extrapolated, unchanged
    assert torch.allclose(inv_yarn[-1], inv_rope[-1] / 4)  # slowest: interpolated by the scale factor


# --- masks ---------------------------------------------------------------------------------------------------


def test_causal_mask_masks_the_future() -> None:
    mask = tutils.get_default_causal_mask(5)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    expected = torch.tensor([[j > i for j in range(5)] for i in range(5)])
    assert torch.equal(mask, expected)
    assert torch.equal(fused_softmax.get_default_causal_mask(5), expected)


@pytest.mark.parametrize(("sq", "skv", "left"), [(8, 8, 2), (8, 8, 0), (4, 10, 3)])
def test_sliding_window_mask_sees_left_plus_one_keys(sq: int, skv: int, left: int) -> None:
    mask = fused_softmax.get_sliding_window_causal_mask(sq, skv, (left, 0))
    offset = skv - sq  # queries are the last sq positions of the keys
    expected = torch.tensor([[not (i + offset - left <= j <= i + offset) for j in range(skv)] for i in range(sq)])
    assert mask.device.type == "cpu"
    assert torch.equal(mask, expected)
    assert torch.equal((~mask).sum(dim=1)[-1], torch.tensor(left + 1))
