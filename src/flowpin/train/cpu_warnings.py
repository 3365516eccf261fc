"""Third-party warnings expected on the CPU reference path: filtered by exact message and module, said once.

Without Transformer Engine (GPU-only) and Apex, megatron-core falls back to its local layers, torch's norms
and torch's optimizers, and each module that makes that choice says so with a ``UserWarning`` when it is
imported: six warnings, a dozen lines, before a training stage prints anything of its own. On a CPU machine
that fallback *is* the reference path, so :func:`filter_expected_warnings` hides exactly those warnings: each
filter matches one full message (anchored at both ends) from one module (``module=`` matched whole), with
the category megatron uses. Anything else still shows, from those modules too: a warning whose text differs
by a word, or the same text from another module. Likewise the three INFO lines megatron's FSDP package
(which flowpin does not use) logs at import, which a stage shows because Hydra logs at INFO: each is dropped
by its exact text on its own logger, nothing else.

The information is not lost: :func:`reference_path_line` is the one line that replaces them, printed by
:func:`flowpin.train.distributed.init_distributed` (rank 0, once per process) only when Transformer Engine
and Apex are really absent; with either of them megatron does not fall back and no line is printed.

``flowpin/train/__init__.py`` calls :func:`filter_expected_warnings`, so the filters are in place before any
flowpin module imports megatron (flowpin imports megatron only inside :mod:`flowpin.train`, lazily).
Explicit warning options win: with ``python -W ...`` or ``PYTHONWARNINGS`` set (``sys.warnoptions``), nothing
is filtered, so ``python -W default stages/train.py`` shows every warning and log line. This module imports
neither torch nor megatron.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import sys
import warnings


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedWarning:
    """One warning a third-party module issues on the CPU reference path."""

    module: str
    """The issuing module's ``__name__`` (what :mod:`warnings` matches ``module=`` against)."""
    message: str
    """The whole message, verbatim."""
    category: type[Warning] = UserWarning


_TE_APEX = "Transformer Engine and Apex are not installed. Falling back to "
_TORCH_NORM = "Apex is not installed. Falling back to Torch Norm"

EXPECTED_CPU_WARNINGS: tuple[ExpectedWarning, ...] = (
    ExpectedWarning(
        module="megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision",
        message=_TE_APEX + "local implementations of multi_tensor_applier and multi_tensor_scale",
    ),
    ExpectedWarning(module="megatron.core.optimizer", message=_TE_APEX + "Torch optimizers."),
    ExpectedWarning(
        module="megatron.core.optimizer.optimizer",
        message=_TE_APEX + "local implementations of multi_tensor_applier and multi_tensor_scale",
    ),
    ExpectedWarning(
        module="megatron.core.optimizer.clip_grads",
        message=_TE_APEX + "local implementations of multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale",
    ),
    ExpectedWarning(module="megatron.core.models.backends", message=_TORCH_NORM),
    ExpectedWarning(module="megatron.core.models.gpt.gpt_layer_specs", message=_TORCH_NORM),
)
"""What megatron-core 0.16.1 warns at import without Transformer Engine and Apex (and nothing else)."""

_FSDP = "megatron.core.distributed.fsdp.src.megatron_fsdp"
_DETECTED = "Detected Megatron Core, using Megatron-FSDP with Megatron."

EXPECTED_IMPORT_LOGS: tuple[tuple[str, str], ...] = (
    (f"{_FSDP}.mixed_precision", "Using Megatron-FSDP without Transformer Engine."),
    (f"{_FSDP}.param_and_grad_buffer", _DETECTED),
    (f"{_FSDP}.megatron_fsdp", _DETECTED),
)
"""(logger, message): the INFO lines megatron-core 0.16.1's FSDP package logs at import on the CPU path."""


class _DropExact(logging.Filter):
    """Drops the records whose message is exactly ``message`` (attached to the one logger that logs it)."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message

    def __eq__(self, other: object) -> bool:  # equal filters: installing them again adds none
        return isinstance(other, _DropExact) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)


def filter_expected_warnings() -> bool:
    """Ignore each of :data:`EXPECTED_CPU_WARNINGS` by exact message and module, and drop each of
    :data:`EXPECTED_IMPORT_LOGS` by exact message on its logger; idempotent.

    Returns whether the filters are in place: ``False`` when the interpreter was given warning options
    (``-W``, ``PYTHONWARNINGS``), which then decide alone.
    """
    if sys.warnoptions:
        return False
    for w in EXPECTED_CPU_WARNINGS:
        # filterwarnings matches message (case-insensitively) and module from their start: \Z anchors the end.
        warnings.filterwarnings(
            "ignore", message=re.escape(w.message) + r"\Z", category=w.category, module=re.escape(w.module) + r"\Z"
        )  # an identical filter replaces the earlier one: calling this again adds nothing
    for name, message in EXPECTED_IMPORT_LOGS:
        logging.getLogger(name).addFilter(_DropExact(message))  # an equal filter is not added twice
    return True


def reference_path_line(*, cuda: bool) -> str | None:
    """The line that says megatron runs its fallbacks (what the filtered warnings said), or ``None``.

    ``None`` when Transformer Engine is importable or Apex is installed: megatron then takes its optimizers
    and multi-tensor kernels from them and does not issue the "Transformer Engine and Apex are not installed"
    warnings (with TE and without Apex it still says "Apex is not installed. Falling back to Torch Norm": that
    is the norm of megatron's local layer spec, which a TE model does not use). ``cuda``: whether this process
    trains on a GPU (the fallback is the reference path on a CPU, a slow path on a GPU).
    """
    from flowpin.environment import probe_transformer_engine

    if importlib.util.find_spec("apex") is not None or probe_transformer_engine()["importable"]:
        return None
    fallback = "megatron-core's local layers, torch's norms and optimizers"
    if cuda:
        return f"flowpin: no Transformer Engine, no Apex on this CUDA machine: {fallback} (slower: install '.[gpu]')"
    hidden = "" if sys.warnoptions else " (megatron's warnings saying so are filtered: flowpin.train.cpu_warnings)"
    return f"flowpin: CPU reference path: no Transformer Engine, no Apex: {fallback}{hidden}"


__all__ = [
    "EXPECTED_CPU_WARNINGS",
    "EXPECTED_IMPORT_LOGS",
    "ExpectedWarning",
    "filter_expected_warnings",
    "reference_path_line",
]
