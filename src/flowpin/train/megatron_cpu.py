"""megatron-core 0.16.1 on a machine without CUDA: the few CUDA-only spots, replaced by CPU equivalents.

Megatron-core's local (non-Transformer-Engine) GPT path runs on CPU except for a handful of functions that
hard-code CUDA. :func:`apply` replaces exactly those, and only when CUDA is absent (or when told to):

==============================================================  =================================================
patched attribute (``megatron.core.`` omitted below)            why, and what the CPU version does
==============================================================  =================================================
``tensor_parallel.random.CudaRNGStatesTracker.add``             seeds a named stream with ``torch.cuda`` RNG;
                                                                here: the state of a fresh CPU generator seeded
                                                                with ``seed`` (the global CPU stream untouched)
``tensor_parallel.random.CudaRNGStatesTracker.fork``            attention/embedding dropout always fork it; here
                                                                it swaps the named state into the default CPU
                                                                generator and back (same bookkeeping, no
                                                                "CPU RNG state changed" warning)
``tensor_parallel.random._get_cuda_rng_state`` / ``_set_...``   used by activation recompute and
                                                                ``get_all_rng_states``; here the CPU state
``utils.GlobalMemoryBuffer.get_tensor``                         the attention score buffer (``baddbmm`` with
                                                                ``beta=0``) is allocated on CPU
``models.common.embeddings.rotary_pos_embedding.``              moved ``inv_freq`` to ``cuda`` on first use;
``RotaryEmbedding.get_emb``                                     here the identical computation, kept on CPU
``models.common.embeddings.yarn_rotary_pos_embedding.``         the same for YaRN's ``inv_freq_extra/inter``
``YarnRotaryEmbedding.get_emb``
``transformer.utils.get_default_causal_mask`` and               built masks with ``device="cuda"``; here on CPU.
``transformer.utils.get_sliding_window_causal_mask``            ``fusions.fused_softmax`` imported both by name,
(+ the same names in ``fusions.fused_softmax``)                 so its references are replaced too
``distributed.param_and_grad_buffer._ParamAndGradBuffer.``      megatron DDP's flat grad (and param) buffers are
``__init__``                                                    allocated on ``torch.cuda.current_device()``;
                                                                here the original runs with that function
                                                                answering ``"cpu"`` (only during the call), so
                                                                ``DistributedDataParallel`` works on gloo
==============================================================  =================================================

Every original is checked against the sha256 of the source that was reviewed for this module before it is
replaced: a different megatron-core (whose code may have moved or been fixed) makes :func:`apply` raise
instead of silently patching code nobody read. All target modules are imported before anything is
replaced (a module imported afterwards binds the CPU version by name, which is what we want, but would then
fail the source check of its own reference). The patches are idempotent; :func:`applied` names the active
ones so the training manifest can record them, and :func:`restore` puts the originals back (the entry point's
:func:`flowpin.runtime.prepare_environment` does when its stage ends).

:func:`rng_tracker_states` / :func:`set_rng_tracker_states` snapshot and restore megatron's named RNG
streams (``data-parallel-rng``, ``model-parallel-rng``, ``expert-parallel-rng``) for checkpoints; they work
the same with or without the patches (on GPU the states are CUDA generator states).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import operator
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from flowpin.errors import CompatibilityError, FlowpinError

REVIEWED_MEGATRON = "0.16.1"
"""The megatron-core version whose CUDA-only code was reviewed for these patches."""

_TRACKER_DEFAULT = "model-parallel-rng"  # megatron's _MODEL_PARALLEL_RNG_TRACKER_NAME


# --- the CPU replacements ------------------------------------------------------------------------------


def _cpu_tracker_add(self: Any, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` on CPU: track a named stream seeded with ``seed``."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")  # megatron's own exception type and wording
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    self.states_[name] = generator.get_state()


@contextlib.contextmanager
def _cpu_tracker_fork(self: Any, name: str = _TRACKER_DEFAULT) -> Iterator[None]:
    """``CudaRNGStatesTracker.fork`` on CPU: run the block on the named stream, then restore the caller's."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current state name {self._current_state_name} is not the same as the desired state name {name}."
            )
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """``_get_cuda_rng_state`` on CPU: the default CPU generator's state (always a fresh tensor)."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """``_set_cuda_rng_state`` on CPU."""
    torch.set_rng_state(new_state)


def _cpu_get_tensor(
    self: Any, tensor_shape: Any, dtype: torch.dtype, name: str, mem_alloc_context: Callable[[], Any] | None = None
) -> torch.Tensor:
    """``GlobalMemoryBuffer.get_tensor`` on CPU (same reuse rule: grow only when too small)."""
    required_len = functools.reduce(operator.mul, tensor_shape, 1)
    buffer = self.buffer.get((name, dtype))
    if buffer is None or buffer.numel() < required_len:
        with (mem_alloc_context or contextlib.nullcontext)():
            self.buffer[(name, dtype)] = torch.empty(required_len, dtype=dtype, device="cpu", requires_grad=False)
    return self.buffer[(name, dtype)][0:required_len].view(*tensor_shape)  # type: ignore[no-any-return]


def _cpu_rope_get_emb(self: Any, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    """``RotaryEmbedding.get_emb`` without moving ``inv_freq`` to CUDA (otherwise the same computation)."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if not self.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    return emb[:, None, None, :]


def _cpu_yarn_get_emb(self: Any, max_seq_len: int, offset: int = 0) -> tuple[torch.Tensor, float]:
    """``YarnRotaryEmbedding.get_emb`` without moving the inverse frequencies to CUDA."""
    from megatron.core.models.common.embeddings import (  # type: ignore[import-untyped,unused-ignore]
        yarn_rotary_pos_embedding as yarn,
    )

    if self.rotary_interleaved:
        raise ValueError("Yarn RoPE does not support interleaved rotary embeddings")
    low, high = yarn._yarn_find_correction_range(
        self.beta_fast,
        self.beta_slow,
        self.dim,
        self.rotary_base,
        self.original_max_position_embeddings,
        self.correction_range_round_to_int,
    )
    inv_freq_mask = 1.0 - yarn._yarn_linear_ramp_mask(low, high, self.dim // 2, device=self.inv_freq_extra.device).to(
        dtype=torch.float32
    )
    inv_freq = self.inv_freq_inter * (1 - inv_freq_mask) + self.inv_freq_extra * inv_freq_mask
    seq = torch.arange(max_seq_len, device=self.inv_freq_extra.device, dtype=self.inv_freq_extra.dtype) + offset
    freqs = torch.outer(seq, inv_freq)
    mscale = yarn._yarn_get_concentration_factor(self.scaling_factor, self.mscale, self.mscale_all_dim)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :], mscale


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """``get_default_causal_mask`` on CPU: True above the diagonal (masked)."""
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def _cpu_sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """``get_sliding_window_causal_mask`` on CPU: query i sees keys ``i-left .. i+right`` (True = masked)."""
    m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


# --- the patch table -----------------------------------------------------------------------------------


_BUFFER_INIT = "megatron.core.distributed.param_and_grad_buffer._ParamAndGradBuffer.__init__"


def _cpu_buffer_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """``_ParamAndGradBuffer.__init__`` with its buffers on CPU (see the table above).

    The original is called unchanged; only ``torch.cuda.current_device`` answers ``"cpu"`` while it runs
    (under a lock: no other thread sees it). ``nccl_ub`` (NCCL user buffers) is refused, being CUDA only.
    """
    if kwargs.get("nccl_ub") or (len(args) > 9 and args[9]):
        raise CompatibilityError("megatron DDP with nccl_ub needs CUDA; turn it off on a CPU machine")
    original = _ORIGINALS[_BUFFER_INIT]
    with _CUDA_DEVICE_LOCK:
        saved = torch.cuda.current_device
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
        try:
            original(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = saved


_CUDA_DEVICE_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Patch:
    module: str
    """Module that owns the attribute (``megatron.core.utils``)."""
    attr: str
    """Attribute path inside it (``GlobalMemoryBuffer.get_tensor``)."""
    replacement: Callable[..., Any]
    reviewed_sha256: str
    """sha256 of ``inspect.getsource`` of the original that was reviewed (megatron-core 0.16.1)."""

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}"


_RANDOM = "megatron.core.tensor_parallel.random"
_MASKS = "megatron.core.transformer.utils"
_SOFTMAX = "megatron.core.fusions.fused_softmax"
_CAUSAL_SHA = "4638b2c6665fc284592df1e01a55f8af25dbf21fdd06201e20de90427dcd8e6b"
_WINDOW_SHA = "3b5690434c3b131dc3cf96e48f54f57e58b361f87fccd78d6cdad4e9167feee6"

PATCHES: tuple[_Patch, ...] = (
    _Patch(
        _RANDOM,
        "CudaRNGStatesTracker.add",
        _cpu_tracker_add,
        "e5e9ab39a7c1e085fe0b95cb0ef4e25f5c43e3ad9caf876813ef78e3f52f0eec",
    ),
    _Patch(
        _RANDOM,
        "CudaRNGStatesTracker.fork",
        _cpu_tracker_fork,
        "6821e1e397253d43b111f5cb8f7feab6301faacf24deaece01416a7c644322d5",
    ),
    _Patch(
        _RANDOM,
        "_get_cuda_rng_state",
        _cpu_get_rng_state,
        "aa26caaa069c5c4feff0f9f4e69f0f2ab6d6fc7940f71c3a6d0fe9303447d3dc",
    ),
    _Patch(
        _RANDOM,
        "_set_cuda_rng_state",
        _cpu_set_rng_state,
        "b179c9d95438b61c1d9b58e8e13cc6534f2ae2f870d991c42438de53829ed398",
    ),
    _Patch(
        "megatron.core.utils",
        "GlobalMemoryBuffer.get_tensor",
        _cpu_get_tensor,
        "2b843a83eb762098e280232a8a6ad2a826f66ffbddd35a3ea5447b9035310b1d",
    ),
    _Patch(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "RotaryEmbedding.get_emb",
        _cpu_rope_get_emb,
        "d36bc7732392e41930edc9311ccce70bafe0013ce9c1946cebcf8e916eb2c083",
    ),
    _Patch(
        "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
        "YarnRotaryEmbedding.get_emb",
        _cpu_yarn_get_emb,
        "70156bcf5400782539cc3854b85c916e5bf4322ef14ccd1aa53f10d21c39891a",
    ),
    _Patch(_MASKS, "get_default_causal_mask", _cpu_causal_mask, _CAUSAL_SHA),
    _Patch(_MASKS, "get_sliding_window_causal_mask", _cpu_sliding_window_mask, _WINDOW_SHA),
    # fused_softmax did `from megatron.core.transformer.utils import ...`: its own references must change too.
    _Patch(_SOFTMAX, "get_default_causal_mask", _cpu_causal_mask, _CAUSAL_SHA),
    _Patch(_SOFTMAX, "get_sliding_window_causal_mask", _cpu_sliding_window_mask, _WINDOW_SHA),
    _Patch(
        "megatron.core.distributed.param_and_grad_buffer",
        "_ParamAndGradBuffer.__init__",
        _cpu_buffer_init,
        "6dee7ab4c9ec64c8fd77ea60adc8254243ba8dfeeed6e520703ec74e402869d7",
    ),
)
"""Every replacement :func:`apply` makes, in the order it makes them."""

_ORIGINALS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _owner(patch: _Patch) -> tuple[Any, str]:
    owner: Any = importlib.import_module(patch.module)
    *path, leaf = patch.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def _source_sha256(obj: Any) -> str:
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError) as exc:
        raise FlowpinError(f"cannot read the source of {obj!r} to check it before patching: {exc}") from exc
    return hashlib.sha256(source.encode()).hexdigest()


def apply(enabled: bool | None = None) -> list[str]:
    """Replace megatron-core's CUDA-only spots with CPU versions; return the names of the active patches.

    ``enabled=None`` patches only when ``torch.cuda.is_available()`` is false; ``False`` patches nothing
    (returns ``[]``, even if earlier calls patched); ``True`` patches regardless. Idempotent. Raises
    :class:`FlowpinError` when an original is not the code reviewed for megatron-core
    ``REVIEWED_MEGATRON``; then nothing is patched by that call.
    """
    if enabled is None:
        enabled = not torch.cuda.is_available()
    if not enabled:
        return []
    with _LOCK:
        # Resolve and check everything before changing anything: all-or-nothing, and every target module is
        # imported first (a module imported after a patch would bind the replacement, not the original).
        pending = []
        for patch in PATCHES:
            if patch.name in _ORIGINALS:
                continue
            owner, leaf = _owner(patch)
            pending.append((patch, owner, leaf, inspect.getattr_static(owner, leaf)))
        for patch, _owner_obj, _leaf, original in pending:
            digest = _source_sha256(original)
            if digest != patch.reviewed_sha256:
                raise CompatibilityError(
                    f"megatron-core {_megatron_version()}: {patch.name} is not the code flowpin.train.megatron_cpu "
                    f"reviewed (megatron-core {REVIEWED_MEGATRON}; source sha256 {digest} != "
                    f"{patch.reviewed_sha256}); install megatron-core=={REVIEWED_MEGATRON} or re-review the patch"
                )
        for patch, owner, leaf, original in pending:
            _ORIGINALS[patch.name] = original
            setattr(owner, leaf, patch.replacement)
    return applied()


def applied() -> list[str]:
    """Names of the patches now active, in :data:`PATCHES` order (what a manifest should record)."""
    return [p.name for p in PATCHES if p.name in _ORIGINALS]


def restore(only: Collection[str] | None = None) -> list[str]:
    """Put the patched originals back (those named in ``only``, default all); return the names restored.

    :func:`flowpin.runtime.prepare_environment` restores the patches its process group applied when the stage
    ends, so none stays applied for the rest of the process.
    """
    restored = []
    with _LOCK:
        for patch in PATCHES:
            if patch.name in _ORIGINALS and (only is None or patch.name in only):
                owner, leaf = _owner(patch)
                setattr(owner, leaf, _ORIGINALS.pop(patch.name))
                restored.append(patch.name)
    return restored


def _megatron_version() -> str | None:
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


# --- RNG streams for checkpoints -----------------------------------------------------------------------


def rng_tracker_states() -> dict[str, torch.Tensor]:
    """A copy of megatron's named RNG streams (name -> generator state, a CPU ``uint8`` tensor).

    Save it with a checkpoint; together with ``torch.get_rng_state()`` (and the CUDA default generator on a
    GPU) it is everything a resumed run needs to draw the same random numbers. Empty when megatron's
    tracker has not been seeded yet (``model_parallel_cuda_manual_seed``).
    """
    from megatron.core import tensor_parallel  # type: ignore[import-untyped,unused-ignore]

    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {name: state.detach().clone() for name, state in sorted(states.items())}


def set_rng_tracker_states(states: Mapping[str, torch.Tensor]) -> None:
    """Restore streams saved by :func:`rng_tracker_states` (copied, so the caller's tensors stay untouched).

    Raises :class:`FlowpinError` when a state is not a CPU ``uint8`` vector, or when the tracker is already
    seeded with a different set of stream names (a checkpoint from another megatron setup).
    """
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    for name, state in states.items():
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
            raise FlowpinError(f"rng tracker state {name!r}: expected a 1-D uint8 tensor, got {state!r:.80}")
        if state.device.type != "cpu":
            raise FlowpinError(f"rng tracker state {name!r}: generator states live on the CPU, got {state.device}")
    current = set(tracker.get_states())
    if current and current != set(states):
        raise FlowpinError(
            f"rng tracker states name {sorted(states)}, but this process tracks {sorted(current)}; "
            "the checkpoint comes from a different parallel/RNG setup"
        )
    tracker.set_states({name: state.detach().clone() for name, state in states.items()})
