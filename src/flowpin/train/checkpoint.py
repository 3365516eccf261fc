"""Training checkpoints: the complete state to resume a run bitwise, with no pickle anywhere.

A checkpoint is one directory, published atomically (:func:`flowpin.atomic.atomic_directory`: a crash
mid-save leaves the previous tree or none, never a partial one that looks complete)::

    step-000100/
      model.safetensors      the model's state_dict (tied tensors once, see "aliases")
      optimizer.safetensors  per-parameter optimizer state, "<param name>/<key>" (AdamW: exp_avg, exp_avg_sq, step)
      rng.safetensors        "torch/cpu", "torch/cuda/<i>", "extra/<name>" (e.g. Megatron's RNG tracker)
      state.json             canonical JSON: everything else, and the sha256 + size of the three files

``state.json`` (format ``flowpin.checkpoint`` version 1) holds: ``step`` (optimizer steps done),
``tokens_seen``, ``lr`` (of the last step), ``metrics`` (of the last step), ``data`` (the data order --
``dataset_digest``, ``order_seed``, ``batch_size`` -- and ``next_step``, the next batch to draw), the
training ``config`` and its ``config_digest``, ``determinism`` (the settings that change results
bitwise, see :mod:`flowpin.train.loop`) and ``determinism_changes`` (every change a resume met),
``parent`` (the checkpoint a fork started from), ``model`` (``aliases``, JSON ``extra_state``),
``optimizer`` (class, param groups with parameter *names*, non-tensor state), ``rng`` (Python's and
numpy's generator states, JSON-exact), ``flowpin_version`` and ``files``. The sha256 of ``state.json``
therefore pins the whole checkpoint (:func:`state_digest`).

Rules that make the bytes a function of the state (saving the same state twice gives identical files):

* safetensors orders tensors by dtype then name, whatever the dict order; its ``__metadata__`` is
  written in Rust ``HashMap`` order, which changes from process to process once it holds two or more
  keys (measured, safetensors 0.8.0) -- so every file carries exactly one metadata key,
  ``{"format": "pt"}``.
* Tensors are saved contiguous, detached, on CPU. Entries of a state_dict that are the *same view* of
  one storage (tied embeddings) are stored once, under the name that sorts first; the others are listed
  in ``model.aliases``. Distinct views of one storage are stored as separate copies. Files are streamed
  from the tensors' memory (``safetensors.torch.save_file``), fsynced, and hashed by reading them back.
* Non-tensor state_dict entries are refused, except ``*._extra_state`` (Transformer Engine, Megatron):
  a tensor extra state is stored like any tensor (opaque bytes; flowpin never unpickles -- note that TE
  itself may unpickle what it gets back), a JSON value (``None``, numbers, strings, lists, dicts) goes to
  ``model.extra_state`` in state.json and comes back as JSON types (a tuple returns as a list), and
  anything else (``BytesIO``, objects) raises: it could only be stored by pickling.
* The optimizer's state is keyed by parameter *name* (``model.named_parameters()``), not by the
  optimizer's positional index; list-valued param-group entries (``betas``) are restored as tuples.
* Python's ``random`` and numpy's states are plain integers/floats; integers beyond 2**53 (PCG64's
  128-bit state) are written ``{"$int": "<decimal>"}`` and arrays ``{"$ndarray": {...}}``, so they
  round-trip exactly through canonical JSON.

Loading reads each file once, checks its size and sha256 against ``state.json``, then checks names,
dtypes and shapes against the live model and optimizer (``_extra_state`` entries: presence only) before
anything is copied; each failure raises a :class:`flowpin.errors.IntegrityError` subclass naming the file
and the tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file as st_save_file

import flowpin
from flowpin.atomic import atomic_directory, atomic_open, fsync_file, write_error
from flowpin.canonical import canonical_json
from flowpin.constants import CHECKPOINT_NAME
from flowpin.errors import (
    ArtifactUnreadableError,
    CanonicalError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMissingError,
    StrictJSONError,
    WriteError,
)
from flowpin.failpoints import failpoint
from flowpin.hashing import hash_file
from flowpin.jsonio import loads_strict
from flowpin.safeio import open_regular
from flowpin.tensorfile import validate_safetensors

FORMAT = "flowpin.checkpoint"
"""``state.json`` ``format``."""
FORMAT_VERSION = 1
"""``state.json`` ``version``; loaders refuse any other."""
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
TENSOR_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE)
"""The tensor files of every checkpoint, all listed in ``state.json`` ``files``."""
SAFETENSORS_METADATA = {"format": "pt"}
"""The one ``__metadata__`` entry (two or more are written in a per-process random order)."""
EXTRA_STATE_SUFFIX = "_extra_state"
"""torch's state_dict key suffix for ``Module.get_extra_state()`` values."""
DIR_MODE = 0o755
"""A published checkpoint directory's mode (the temporary it starts as is 0700)."""
FILE_MODE = 0o644
"""Mode of every file in a checkpoint."""

_MAX_SAFE_INT = 2**53 - 1
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


# --- state ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataPosition:
    """Where a run stands in its data order (see :mod:`flowpin.data.order`)."""

    dataset_digest: str
    """sha256 directory digest of the tokenized dataset the order is keyed by."""
    order_seed: int
    """The order seed."""
    batch_size: int
    """Sequences per step."""
    next_step: int
    """The order step of the next batch to draw (batches ``0 .. next_step-1`` were seen)."""

    def same_order(self, other: DataPosition) -> bool:
        """Whether both positions are in the same order (same dataset, seed and batch size)."""
        return (self.dataset_digest, self.order_seed, self.batch_size) == (
            other.dataset_digest,
            other.order_seed,
            other.batch_size,
        )


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RngState:
    """Every random generator's state, as :func:`capture_rng` read it."""

    torch_cpu: torch.Tensor
    """``torch.get_rng_state()`` (uint8)."""
    cuda: tuple[torch.Tensor, ...] = ()
    """``torch.cuda.get_rng_state_all()``, one per device (empty without CUDA)."""
    extra: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Caller-owned generator states (e.g. Megatron's RNG tracker); restoring them is the caller's job."""
    python: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """``random.getstate()`` as JSON."""
    numpy: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """``np.random.get_state()`` (the legacy global generator) as JSON."""
    numpy_generators: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Named ``np.random.Generator`` bit-generator states, JSON-exact."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParentRef:
    """The checkpoint a state descends from across a fork."""

    state_sha256: str
    """sha256 of the parent's ``state.json`` (which pins every file of it)."""
    step: int
    """The parent's step."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainState:
    """Everything about a run at a step boundary except the model and optimizer tensors."""

    step: int
    """Optimizer steps completed (the index of the next step)."""
    tokens_seen: int
    """Tokens in all batches trained on so far."""
    data: DataPosition
    """Position in the data order."""
    lr: float
    """Learning rate of the last step taken (recomputed from the schedule, recorded for audit)."""
    config: Mapping[str, Any]
    """The training config as plain JSON (what :attr:`config_digest` hashes)."""
    rng: RngState = dataclasses.field(compare=False)
    """Generator states at this boundary."""
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Deterministic metrics of the last step (loss, grad norm); no timings."""
    determinism: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Settings that change results bitwise, as they were when this state was produced."""
    determinism_changes: tuple[Mapping[str, Any], ...] = ()
    """Every resume or fork that met different settings: ``{"step": s, "changes": [...]}``."""
    parent: ParentRef | None = None
    """The checkpoint a fork started from (``None`` for a run trained from scratch)."""
    source: ParentRef | None = dataclasses.field(default=None, compare=False)
    """The checkpoint this state was loaded from (set by :func:`load_checkpoint`; not saved)."""

    @property
    def config_digest(self) -> str:
        """sha256 of the canonical JSON of :attr:`config`."""
        return hashlib.sha256(canonical_json(self.config)).hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointRef:
    """A complete checkpoint in a run directory."""

    path: Path
    step: int


# --- RNG ------------------------------------------------------------------------------------------


def capture_rng(
    *,
    extra: Mapping[str, torch.Tensor] | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
) -> RngState:
    """Read torch (CPU, and CUDA when available), Python and numpy generator states.

    ``extra`` adds caller-owned generator states as tensors (e.g. Megatron's ``get_cuda_rng_tracker()``
    states); ``numpy_generators`` adds named ``Generator`` objects, restored by :func:`restore_rng`.
    """
    version, internal, gauss_next = random.getstate()
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # legacy=True always returns the tuple form
    name, key, pos, has_gauss, cached = legacy
    cuda: tuple[torch.Tensor, ...] = ()
    if torch.cuda.is_available():
        cuda = tuple(t.clone() for t in torch.cuda.get_rng_state_all())
    return RngState(
        torch_cpu=torch.get_rng_state().clone(),
        cuda=cuda,
        extra={k: v.detach().cpu().clone() for k, v in (extra or {}).items()},
        python={"version": version, "internal": list(internal), "gauss_next": gauss_next},
        numpy={
            "bit_generator": name,
            "key": [int(x) for x in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        numpy_generators={
            k: _to_exact_json(g.bit_generator.state, f"rng.numpy_generators.{k}")
            for k, g in (numpy_generators or {}).items()
        },
    )


def restore_rng(rng: RngState, *, numpy_generators: Mapping[str, np.random.Generator] | None = None) -> list[str]:
    """Set torch, CUDA, Python and numpy generators (and the named ``numpy_generators``) from ``rng``.

    ``rng.extra`` is not touched: its owner restores it. Returns warnings for what could not be
    restored here (CUDA states without CUDA or with fewer devices); a named generator ``rng`` lacks
    raises :class:`IntegrityError`.
    """
    warnings_: list[str] = []
    torch.set_rng_state(rng.torch_cpu)
    if rng.cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available >= len(rng.cuda):
            for index, state in enumerate(rng.cuda):
                torch.cuda.set_rng_state(state, index)
        else:
            warnings_.append(
                f"the checkpoint holds CUDA RNG states for {len(rng.cuda)} device(s) but this process has "
                f"{available}; CUDA random streams (dropout on GPU) do not continue"
            )
    if rng.python:
        random.setstate((rng.python["version"], tuple(rng.python["internal"]), rng.python["gauss_next"]))
    if rng.numpy:
        np.random.set_state(
            (
                rng.numpy["bit_generator"],
                np.asarray(rng.numpy["key"], dtype=np.uint32),
                rng.numpy["pos"],
                rng.numpy["has_gauss"],
                rng.numpy["cached_gaussian"],
            )
        )
    for name, generator in (numpy_generators or {}).items():
        if name not in rng.numpy_generators:
            raise CheckpointError(
                f"rng: no state for numpy generator {name!r} (saved: {sorted(rng.numpy_generators)}); "
                "pass the same generator names to capture_rng and restore_rng"
            )
        generator.bit_generator.state = _from_exact_json(rng.numpy_generators[name])
    return warnings_


def _to_exact_json(value: Any, where: str) -> Any:
    """``value`` in a form canonical JSON holds exactly (big ints and arrays tagged)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        number = int(value)
        return number if abs(number) <= _MAX_SAFE_INT else {"$int": str(number)}
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return {
            "$ndarray": {
                "dtype": value.dtype.str,
                "shape": list(value.shape),
                "values": [_to_exact_json(v, where) for v in value.ravel().tolist()],
            }
        }
    if isinstance(value, Mapping):
        return {str(k): _to_exact_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_exact_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CanonicalError(f"{where}: {type(value).__name__} has no exact JSON form")


def _from_exact_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"$int"}:
            return int(value["$int"])
        if set(value) == {"$ndarray"}:
            spec = value["$ndarray"]
            flat = [_from_exact_json(v) for v in spec["values"]]
            return np.asarray(flat, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
        return {k: _from_exact_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_exact_json(v) for v in value]
    return value


# --- save -----------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: TrainState, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write ``state``, ``model`` and ``optimizer`` as a checkpoint directory at ``path``, atomically.

    An existing directory at ``path`` is replaced as a whole. Raises :class:`CanonicalError` for state
    that has no pickle-free form (see the module docstring), :class:`flowpin.errors.WriteError` when the
    disk refuses; in both cases nothing is published.
    """
    model_tensors, aliases, extra_json = _model_entries(model)
    optim_tensors, optim_json = _optimizer_entries(model, optimizer)
    rng_tensors = _rng_tensors(state.rng)
    document = _state_json(state)  # checks the JSON parts before any byte is written
    document["model"] = {"aliases": aliases, "extra_state": extra_json}
    document["optimizer"] = optim_json
    with atomic_directory(path) as tmp:
        os.chmod(tmp, DIR_MODE)
        files = {}
        for name, tensors in ((MODEL_FILE, model_tensors), (OPTIMIZER_FILE, optim_tensors), (RNG_FILE, rng_tensors)):
            failpoint("checkpoint.before-file", str(tmp / name))
            files[name] = _write_tensors(tmp / name, tensors)
        document["files"] = files
        failpoint("checkpoint.before-state", str(tmp / STATE_FILE))
        with atomic_open(tmp / STATE_FILE) as fh:
            fh.write(canonical_json(document) + b"\n")


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write one safetensors file inside the checkpoint's temporary directory; returns ``{"sha256", "size"}``.

    ``save_file`` streams from the tensors' memory (``save`` would first build the whole file as one
    ``bytes``: twice the memory, and measured 2x slower); the file is fsynced and hashed by reading it back.
    """
    try:
        st_save_file(tensors, path, metadata=dict(SAFETENSORS_METADATA))
    except SafetensorError as exc:
        os_error = re.search(r"\(os error (\d+)\)", str(exc))  # the Rust side reports only the errno
        if os_error is not None:
            code = int(os_error[1])
            raise write_error(path, OSError(code, os.strerror(code), str(path))) from exc
        raise WriteError(f"could not write {path.name}: {exc}; nothing was published") from exc
    fsync_file(path)
    os.chmod(path, FILE_MODE)
    return {"sha256": hash_file(path, "sha256"), "size": path.stat().st_size}


def _state_json(state: TrainState) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "flowpin_version": flowpin.__version__,
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "lr": state.lr,
        "metrics": dict(state.metrics),
        "data": dataclasses.asdict(state.data),
        "config": state.config,
        "config_digest": state.config_digest,
        "determinism": dict(state.determinism),
        "determinism_changes": list(state.determinism_changes),
        "parent": None if state.parent is None else dataclasses.asdict(state.parent),
        "rng": {
            "python": state.rng.python,
            "numpy": state.rng.numpy,
            "numpy_generators": state.rng.numpy_generators,
            "cuda_devices": len(state.rng.cuda),
            "extra": sorted(state.rng.extra),
        },
    }
    try:
        canonical_json(body)
    except CanonicalError as exc:
        raise CanonicalError(f"checkpoint state.json: {exc}; keep config and metrics JSON-able and finite") from exc
    return body


def _is_extra_state(name: str) -> bool:
    return name == EXTRA_STATE_SUFFIX or name.endswith("." + EXTRA_STATE_SUFFIX)


def _model_entries(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """(tensors to store, alias -> stored name, JSON extra states) of ``model.state_dict()``."""
    tensors: dict[str, torch.Tensor] = {}
    extra_json: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif _is_extra_state(name):
            try:
                canonical_json(value)
            except CanonicalError as exc:
                raise CanonicalError(
                    f"{MODEL_FILE}: {name} holds a {type(value).__name__}, which cannot be stored without pickle; "
                    "make get_extra_state() return a tensor or a JSON value (None, numbers, strings, lists, dicts)"
                ) from exc
            extra_json[name] = value
        else:
            raise CanonicalError(
                f"{MODEL_FILE}: state_dict entry {name} is a {type(value).__name__}, not a tensor; "
                "flowpin stores no pickles -- register it as a buffer or move it to _extra_state"
            )
    stored, aliases = _dedupe(tensors, MODEL_FILE)
    return stored, aliases, extra_json


def _view_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``alias -> name`` for entries that are the same view of one storage (the first name sorted is kept)."""
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel() == 0:  # empty tensors may all report data_ptr 0
            continue
        key = _view_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _dedupe(tensors: Mapping[str, torch.Tensor], file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (aliases dropped) and the aliases; distinct views sharing a storage become copies."""
    aliases = _aliases(tensors)
    kept = {name: tensors[name].detach() for name in sorted(tensors) if name not in aliases}
    users: dict[tuple[Any, ...], int] = {}
    for t in kept.values():
        if t.numel():
            storage = (t.device, t.untyped_storage().data_ptr())
            users[storage] = users.get(storage, 0) + 1
    out: dict[str, torch.Tensor] = {}
    for name, t in kept.items():
        _check_dtype(t, file, name)
        shared = t.numel() > 0 and users[(t.device, t.untyped_storage().data_ptr())] > 1
        cpu = t.to("cpu")
        # safetensors refuses tensors that share memory; a copy of each view keeps the values exactly
        out[name] = cpu.clone(memory_format=torch.contiguous_format) if shared else cpu.contiguous()
    return out, aliases


def _check_dtype(t: torch.Tensor, file: str, name: str) -> None:
    if t.dtype not in _ST_DTYPES:
        raise CanonicalError(
            f"{file}: {name} has dtype {t.dtype}, which flowpin's checkpoints do not store; cast it "
            f"(stored dtypes: {', '.join(sorted(str(d) for d in _ST_DTYPES))})"
        )
    if t.layout != torch.strided:
        raise CanonicalError(f"{file}: {name} is a {t.layout} tensor; convert it to a dense tensor")


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_entries(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    names = _param_names(model)
    sd = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    for g, (live, saved) in enumerate(zip(optimizer.param_groups, sd["param_groups"], strict=True)):
        group_names = []
        for param, index in zip(live["params"], saved["params"], strict=True):
            if id(param) not in names:
                raise CanonicalError(
                    f"{OPTIMIZER_FILE}: param group {g} holds a parameter of shape {list(param.shape)} that is not "
                    "a parameter of the model, so it has no name to be saved under; build the optimizer from "
                    "model.parameters()"
                )
            index_to_name[index] = names[id(param)]
            group_names.append(names[id(param)])
        hyper = {}
        for key, value in saved.items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor):
                raise CanonicalError(f"{OPTIMIZER_FILE}: param group {g} {key} is a tensor; use a Python number for it")
            hyper[key] = value
        try:
            canonical_json(hyper)
        except CanonicalError as exc:
            raise CanonicalError(f"{OPTIMIZER_FILE}: param group {g}: {exc}") from exc
        groups.append({**hyper, "params": group_names})
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        name = index_to_name[index]
        for key, value in per_param.items():
            label = f"{name}/{key}"
            if isinstance(value, torch.Tensor):
                tensors[label] = value
            else:
                try:
                    canonical_json(value)
                except CanonicalError as exc:
                    raise CanonicalError(f"{OPTIMIZER_FILE}: state {label}: {exc}") from exc
                scalars.setdefault(name, {})[key] = value
    stored, aliases = _dedupe(tensors, OPTIMIZER_FILE)
    for alias in aliases:  # an optimizer has no tied state; store every entry, as a copy
        stored[alias] = tensors[alias].detach().to("cpu").clone(memory_format=torch.contiguous_format)
    cls = type(optimizer)
    return stored, {"class": f"{cls.__module__}.{cls.__qualname__}", "param_groups": groups, "state": scalars}


def _rng_tensors(rng: RngState) -> dict[str, torch.Tensor]:
    tensors = {"torch/cpu": rng.torch_cpu.detach().cpu().contiguous()}
    for index, state in enumerate(rng.cuda):
        tensors[f"torch/cuda/{index}"] = state.detach().cpu().contiguous()
    for name, state in rng.extra.items():
        _check_dtype(state, RNG_FILE, f"extra/{name}")
        tensors[f"extra/{name}"] = state.detach().cpu().contiguous()
    return tensors


# --- load -----------------------------------------------------------------------------------------


def state_digest(path: Path) -> str:
    """sha256 of a checkpoint's ``state.json`` -- which pins every other file of it."""
    return hashlib.sha256(_read(path / STATE_FILE)).hexdigest()


def read_state(path: Path, *, verify_files: bool = True) -> TrainState:
    """The :class:`TrainState` of the checkpoint at ``path`` without loading a model (nothing is restored).

    ``rng.safetensors`` is always verified and read; with ``verify_files`` the model and optimizer files'
    sizes and sha256 are checked too. Raises :class:`ArtifactMissingError`,
    :class:`ArtifactUnreadableError`, :class:`DigestMismatchError` or :class:`IntegrityError` naming the file.
    """
    raw = _read(path / STATE_FILE)
    document = _parse_state(raw, path)
    if verify_files:
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            _verified_bytes(path, name, document)
    rng = _rng_from(path, document, _load_tensors(path, RNG_FILE, document))
    return _state_from_json(document, rng, path, raw)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    restore_rng_state: bool = True,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
) -> TrainState:
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``); return its :class:`TrainState`.

    Everything is verified before the first tensor is copied: each file's size and sha256, every
    tensor's name, dtype and shape against the live model and optimizer, the tied-weight structure.
    With ``restore_rng_state`` the torch/CUDA/Python/numpy generators are set too (``state.rng.extra``
    is returned for its owner to restore; what cannot be restored here is warned about).
    ``optimizer=None`` loads the weights only (evaluation; the optimizer file is then not even read).
    """
    raw_state = _read(path / STATE_FILE)
    document = _parse_state(raw_state, path)
    model_st = _load_tensors(path, MODEL_FILE, document)
    optim_st = _load_tensors(path, OPTIMIZER_FILE, document) if optimizer is not None else {}
    rng_st = _load_tensors(path, RNG_FILE, document)
    model_sd = _model_state_dict(path, document, model_st, model)
    optim_sd = _optimizer_state_dict(path, document, optim_st, model, optimizer) if optimizer is not None else None
    rng = _rng_from(path, document, rng_st)
    state = _state_from_json(document, rng, path, raw_state)

    model.load_state_dict(model_sd, strict=True)
    if optimizer is not None and optim_sd is not None:
        optimizer.load_state_dict(optim_sd)
    if restore_rng_state:
        for problem in restore_rng(rng, numpy_generators=numpy_generators):
            warnings.warn(f"{path}: {problem}", RuntimeWarning, stacklevel=2)
    return state


MAX_STATE_BYTES = 64 << 20
"""Largest ``state.json`` read: the biggest real one (a 32B model's optimizer groups by parameter name) is a
few MiB."""


def _read(path: Path, size: object = None) -> bytes:
    """The bytes of a checkpoint file, a regular file only (a FIFO or /dev/zero would hang or exhaust memory).

    ``size`` (a tensor file's size as state.json records it): a file of another size is refused before it
    is read; ``None`` (state.json): at most :data:`MAX_STATE_BYTES`.
    """
    try:
        bound = MAX_STATE_BYTES if size is None else None
        with open_regular(path, max_bytes=bound, what="checkpoint file", fix=_DAMAGED) as f:
            if size is not None and f.size != size:
                raise CheckpointCorruptError(
                    f"{path}: {f.size} bytes, state.json records {size}; the file is truncated or was replaced -- "
                    "restore it or resume from an earlier checkpoint"
                )
            return f.read_all()
    except FileNotFoundError as exc:
        if not path.parent.is_dir():
            raise CheckpointMissingError(f"{path.parent}: no checkpoint directory here") from exc
        raise CheckpointMissingError(
            f"{path}: missing from the checkpoint; it is incomplete or damaged -- restore it or resume from "
            "an earlier checkpoint"
        ) from exc
    except OSError as exc:
        raise ArtifactUnreadableError(f"{path}: cannot read ({exc.strerror or exc}); check permissions") from exc


def _parse_state(raw: bytes, path: Path) -> dict[str, Any]:
    where = path / STATE_FILE
    try:
        document = loads_strict(raw, where=str(where), max_bytes=MAX_STATE_BYTES)
    except StrictJSONError as exc:  # not JSON, duplicate keys, NaN/Infinity, too deep
        raise ArtifactUnreadableError(f"{where}: not valid JSON ({exc.reason}); {_DAMAGED}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a flowpin checkpoint (format is not {FORMAT!r}); {_DAMAGED}")
    if document.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {document.get('version')!r}; this flowpin reads version "
            f"{FORMAT_VERSION} -- use the flowpin that wrote it"
        )
    for key, kind in (
        ("step", int),
        ("tokens_seen", int),
        ("lr", (int, float)),
        ("data", dict),
        ("config", dict),
        ("files", dict),
        ("model", dict),
        ("optimizer", dict),
        ("rng", dict),
    ):
        if not isinstance(document.get(key), kind) or isinstance(document.get(key), bool):
            raise CheckpointError(f"{where}: field {key!r} is missing or has the wrong type; {_DAMAGED}")
    for name in TENSOR_FILES:
        entry = document["files"].get(name)
        if not (
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
        ):
            raise CheckpointError(f"{where}: 'files' has no sha256 and size for {name}; {_DAMAGED}")
    return document


def _verified_bytes(path: Path, name: str, document: Mapping[str, Any]) -> bytes:
    entry = document["files"][name]
    data = _read(path / name, entry.get("size"))
    if len(data) != entry.get("size"):
        raise CheckpointCorruptError(
            f"{path / name}: {len(data)} bytes, state.json records {entry.get('size')}; the file is truncated "
            "or was replaced -- restore it or resume from an earlier checkpoint"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.get("sha256"):
        raise CheckpointCorruptError(
            f"{path / name}: sha256 {actual}, state.json records {entry.get('sha256')}; the file is corrupt "
            "or was replaced -- restore it or resume from an earlier checkpoint"
        )
    return data


def _load_tensors(path: Path, name: str, document: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    data = _verified_bytes(path, name, document)
    # state.json is not signed: a file re-pinned there passes the digest check, so the header and offsets
    # are validated before the safetensors library parses anything.
    validate_safetensors(data, where=str(path / name), fix=_DAMAGED)
    try:
        return st_load(data)
    except (SafetensorError, ValueError, KeyError) as exc:
        raise ArtifactUnreadableError(f"{path / name}: not a readable safetensors file ({exc}); {_DAMAGED}") from exc


_DAMAGED = "the checkpoint is damaged or was crafted -- restore it or resume from an earlier checkpoint"


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _model_state_dict(
    path: Path, document: Mapping[str, Any], stored: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, Any]:
    """The state_dict to load, after checking the checkpoint's entries against the live model's.

    Parameters and buffers must match by name, dtype and shape. An ``_extra_state`` entry must exist on
    both sides, but its form is not compared: it is the module's serialised runtime state (Transformer
    Engine's FP8 metadata grows from an empty tensor once FP8 has run), not a layout.
    """
    where = path / MODEL_FILE
    aliases: dict[str, str] = document["model"].get("aliases", {})
    extra_json: dict[str, Any] = document["model"].get("extra_state", {})
    live_sd = model.state_dict()
    live_tensors = {k: v for k, v in live_sd.items() if isinstance(v, torch.Tensor)}
    live_aliases = _aliases(live_tensors)
    if live_aliases != aliases:
        raise CheckpointError(
            f"{where}: the checkpoint ties {aliases or 'no tensors'} but the model ties "
            f"{live_aliases or 'no tensors'}; build the model with the same weight tying"
        )
    unexpected = sorted((set(stored) | set(extra_json)) - (set(live_sd) - set(aliases)))
    if unexpected:
        raise CheckpointError(f"{where}: holds {unexpected[0]}, which the model does not have (model/config mismatch)")
    out: dict[str, Any] = {}
    for name, live in live_sd.items():
        if name in aliases:
            if aliases[name] not in stored:
                raise CheckpointError(f"{where}: lacks tensor {aliases[name]}, which {name} is tied to")
            out[name] = stored[aliases[name]]
        elif _is_extra_state(name):
            if name in stored:
                out[name] = stored[name].clone()  # the module may keep it; loaded tensors view read-only bytes
            elif name in extra_json:
                out[name] = extra_json[name]
            else:
                raise CheckpointError(f"{where}: lacks extra state {name}, which the model has")
        elif name not in stored:
            raise CheckpointError(f"{where}: lacks tensor {name}, which the model has (model/config mismatch)")
        elif stored[name].dtype != live.dtype or stored[name].shape != live.shape:
            raise CheckpointError(
                f"{where}: tensor {name} is {_describe(stored[name])} in the checkpoint, {_describe(live)} in the "
                "model; build the model with the config the checkpoint was trained with"
            )
        else:
            out[name] = stored[name]
    return out


_PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "sum"})
"""Optimizer state keys whose tensor has its parameter's shape (checked on load)."""


def _optimizer_state_dict(
    path: Path,
    document: Mapping[str, Any],
    stored: dict[str, torch.Tensor],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    where = path / OPTIMIZER_FILE
    saved = document["optimizer"]
    cls = type(optimizer)
    live_class = f"{cls.__module__}.{cls.__qualname__}"
    if saved.get("class") != live_class:
        raise CheckpointError(f"{where}: saved by optimizer {saved.get('class')}, loading into {live_class}")
    names = _param_names(model)
    groups = saved.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{where}: {len(groups)} param group(s) in the checkpoint, {len(optimizer.param_groups)} in the optimizer"
        )
    params_by_name: dict[str, torch.Tensor] = {}
    out_groups: list[dict[str, Any]] = []
    index = 0
    name_to_index: dict[str, int] = {}
    for g, (group, live) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        live_names = []
        for p in live["params"]:
            if id(p) not in names:
                raise CheckpointError(f"{where}: the optimizer holds a parameter that is not one of the model's")
            live_names.append(names[id(p)])
            params_by_name[names[id(p)]] = p
        if list(group.get("params", [])) != live_names:
            raise CheckpointError(
                f"{where}: param group {g} holds {group.get('params')} in the checkpoint, {live_names} in the "
                "optimizer; build the optimizer's groups as the run that saved it did"
            )
        restored = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items() if k != "params"}
        restored["params"] = list(range(index, index + len(live_names)))
        for offset, name in enumerate(live_names):
            name_to_index[name] = index + offset
        index += len(live_names)
        out_groups.append(restored)
    state: dict[int, dict[str, Any]] = {}
    for label, tensor in stored.items():
        name, sep, key = label.rpartition("/")
        if not sep or name not in name_to_index:
            raise CheckpointError(f"{where}: holds state {label} for no parameter of the optimizer")
        param = params_by_name[name]
        if key in _PARAM_SHAPED and tensor.shape != param.shape:
            raise CheckpointError(f"{where}: state {label} is {_describe(tensor)}, the parameter is {_describe(param)}")
        state.setdefault(name_to_index[name], {})[key] = tensor.clone()  # loaded tensors view read-only bytes
    for name, scalars in saved.get("state", {}).items():
        if name not in name_to_index:
            raise CheckpointError(f"{where}: holds state for {name}, which is not a parameter of the optimizer")
        state.setdefault(name_to_index[name], {}).update(scalars)
    return {"state": state, "param_groups": out_groups}


def _rng_from(path: Path, document: Mapping[str, Any], stored: dict[str, torch.Tensor]) -> RngState:
    where = path / RNG_FILE
    meta = document["rng"]
    if "torch/cpu" not in stored:
        raise CheckpointError(f"{where}: lacks torch/cpu")
    cuda = []
    for index in range(int(meta.get("cuda_devices", 0))):
        key = f"torch/cuda/{index}"
        if key not in stored:
            raise CheckpointError(f"{where}: lacks {key}")
        cuda.append(stored[key].clone())
    extra = {k.removeprefix("extra/"): v.clone() for k, v in stored.items() if k.startswith("extra/")}
    if sorted(extra) != sorted(meta.get("extra", [])):
        raise CheckpointError(f"{where}: extra RNG states {sorted(extra)} differ from state.json {meta.get('extra')}")
    return RngState(
        torch_cpu=stored["torch/cpu"].clone(),
        cuda=tuple(cuda),
        extra=extra,
        python=meta.get("python", {}),
        numpy=meta.get("numpy", {}),
        numpy_generators=meta.get("numpy_generators", {}),
    )


def _state_from_json(document: Mapping[str, Any], rng: RngState, path: Path, raw: bytes) -> TrainState:
    try:
        data = DataPosition(**document["data"])
        parent = document.get("parent")
        return TrainState(
            step=document["step"],
            tokens_seen=document["tokens_seen"],
            data=data,
            lr=float(document["lr"]),
            config=document["config"],
            rng=rng,
            metrics=document.get("metrics", {}),
            determinism=document.get("determinism", {}),
            determinism_changes=tuple(document.get("determinism_changes", ())),
            parent=None if parent is None else ParentRef(**parent),
            source=ParentRef(state_sha256=hashlib.sha256(raw).hexdigest(), step=document["step"]),
        )
    except TypeError as exc:
        raise CheckpointError(f"{path / STATE_FILE}: malformed ({exc})") from exc


# --- run directories -------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` steps (``step-000100``)."""
    return f"step-{step:06d}"


def list_checkpoints(directory: Path) -> list[CheckpointRef]:
    """Complete checkpoints in ``directory`` (those with a ``state.json``), by step.

    Hidden temporaries of an interrupted save (``.step-000100.*.tmp``) are never listed: a checkpoint
    directory only appears under its name once complete.
    """
    if not directory.is_dir():
        return []
    out = []
    for child in directory.iterdir():
        match = CHECKPOINT_NAME.fullmatch(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            out.append(CheckpointRef(path=child, step=int(match.group(1))))
    return sorted(out, key=lambda ref: ref.step)


_TEMPORARY = re.compile(r"\.step-\d{6,}\.(.+\.tmp|old-\d+)")
"""What an interrupted :func:`save_checkpoint` can leave behind (see :func:`flowpin.atomic.atomic_directory`)."""


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete what killed saves left in ``directory`` (hidden ``.step-*`` temporaries); returns them.

    Only for a directory no other process is saving into (a run directory has one trainer).
    """
    removed = []
    if directory.is_dir():
        for child in sorted(directory.iterdir()):
            if _TEMPORARY.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
                removed.append(child)
    return removed


def latest_checkpoint(directory: Path) -> CheckpointRef | None:
    """The complete checkpoint with the highest step in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "STATE_FILE",
    "CheckpointRef",
    "DataPosition",
    "ParentRef",
    "RngState",
    "TrainState",
    "capture_rng",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_state",
    "remove_stale_temporaries",
    "restore_rng",
    "save_checkpoint",
    "state_digest",
]
