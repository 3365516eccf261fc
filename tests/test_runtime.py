"""flowpin.runtime.prepare_environment: the one place a stage's process is prepared, and undone afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state  # type: ignore[import-untyped,unused-ignore]

from flowpin.runtime import Runtime, prepare_environment
from flowpin.train import megatron_cpu

NAMES = [p.name for p in megatron_cpu.PATCHES]
PIN = "FLOWPIN_TEST_RUNTIME_PIN"


@pytest.fixture
def clean_process() -> Iterator[None]:
    """No process group, no CPU patches, no pin; torch's settings put back afterwards."""
    assert not dist.is_initialized()
    patched = megatron_cpu.applied()
    megatron_cpu.restore()
    threads, flags = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    os.environ.pop(PIN, None)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(flags)
    if patched:
        megatron_cpu.apply(enabled=True)


def test_it_prepares_the_process_and_puts_everything_back(clean_process: None) -> None:
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    torch.use_deterministic_algorithms(False)
    with prepare_environment(seed=7, threads=other, env={PIN: "on"}) as runtime:
        assert isinstance(runtime, Runtime)
        assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
        assert (runtime.dist.rank, runtime.dist.world_size, runtime.dist.is_main) == (0, 1, True)
        assert list(runtime.dist.cpu_patches) == megatron_cpu.applied() == NAMES  # a machine without CUDA
        assert torch.get_num_threads() == other and torch.are_deterministic_algorithms_enabled()
        assert os.environ[PIN] == "on"
        record = dict(runtime.determinism)
        assert record["seed"] == 7 and record["numThreads"] == other
        assert record["megatronRngStreams"] is True  # seeded after the parallel state exists
        with pytest.raises(TypeError):
            runtime.determinism["seed"] = 8  # type: ignore[index]  # a value, read-only
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    assert megatron_cpu.applied() == []  # none left applied for the rest of the process
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert PIN not in os.environ


def test_patches_applied_before_stay_and_a_failing_body_still_undoes_it(clean_process: None) -> None:
    megatron_cpu.apply(enabled=True)
    os.environ[PIN] = "before"
    with (
        pytest.raises(RuntimeError, match="the body failed"),
        prepare_environment(seed=0, threads=None, env={PIN: "x"}),
    ):
        assert os.environ[PIN] == "x"
        raise RuntimeError("the body failed")
    assert not dist.is_initialized()
    assert megatron_cpu.applied() == NAMES  # not this call's to restore
    assert os.environ.pop(PIN) == "before"


def test_the_seed_fixes_the_generators(clean_process: None) -> None:
    with prepare_environment(seed=3, threads=None):
        first = torch.rand(3)
    with prepare_environment(seed=3, threads=None):
        assert torch.equal(torch.rand(3), first)
