"""The eval recipe: the typed, validated ``eval`` block of ``params/eval.yaml``.

What the eval stage (:mod:`flowpin.post.eval`) is told to measure: which stages' checkpoints, which held-out
text (:class:`HeldoutTextConfig`, for bits per byte) and how many held-out tasks (:class:`TasksConfig`, for
pass@1), which decontamination report to attach, and the threads and seed the entry point fixes before it
runs. Validation here is about the recipe alone; whether the inputs it names exist and fit together is
checked by :mod:`flowpin.post.eval_inputs`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import PurePosixPath

from flowpin.errors import RecipeError
from flowpin.recipe import check_int

DATA_ROLES = ("synth", "tokenizer", "decontaminate", "ingest")
"""The ``paths.inputs`` roles that are not checkpoints: held-out tasks, tokenizer, decontamination, corpus."""

_STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutTextConfig:
    """Held-out text for bits-per-byte (``eval.text``)."""

    files: tuple[str, ...]
    """Standard-library files (POSIX paths relative to the stdlib root) the reference corpus did not ingest;
    each is checked against every ingest source record (sha256 and path) before any model runs."""
    window: int = 256
    """Tokens predicted per forward pass; the context resets at each window. Must not exceed any evaluated
    model's context (256 for pretrain/midtrain)."""
    batch_size: int = 8
    """Windows per forward pass."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if not isinstance(self.files, tuple) or not self.files:
            raise RecipeError(f"{where}.files: list at least one standard-library file (e.g. asyncio/queues.py)")
        for j, name in enumerate(self.files):
            _check_relative(name, f"{where}.files[{j}]", "the stdlib root")
        if len(set(self.files)) != len(self.files):
            raise RecipeError(f"{where}.files: a file is listed twice")
        check_int(self.window, f"{where}.window", minimum=1, maximum=65536)
        check_int(self.batch_size, f"{where}.batch_size", minimum=1, maximum=4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TasksConfig:
    """The held-out verifiable tasks for pass@1 (``eval.tasks``)."""

    per_kind: int | None = None
    """Evaluate the first ``per_kind`` tasks of each kind (held-out order); ``None``: all of them."""
    max_new_tokens: int = 40
    """Greedy tokens generated at most per response (the longest reference solution is 32 with EOS)."""
    batch_size: int = 8
    """Prompts decoded together (right-padded; a batch stops when all of its rows have stopped)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if self.per_kind is not None:
            check_int(self.per_kind, f"{where}.per_kind", minimum=1)
        check_int(self.max_new_tokens, f"{where}.max_new_tokens", minimum=1, maximum=4096)
        check_int(self.batch_size, f"{where}.batch_size", minimum=1, maximum=4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The eval recipe (``eval`` in ``params/eval.yaml``). Validated on construction."""

    stages: tuple[str, ...]
    """Stages whose latest checkpoint is evaluated, one table row each, in this order. Each names a
    ``paths.inputs`` role (its checkpoints directory and manifest)."""
    text: HeldoutTextConfig
    """Held-out text for bits-per-byte."""
    tasks: TasksConfig
    """Held-out tasks for pass@1."""
    decontamination_report: str
    """The decontaminate stage's report (repository-relative): checked against that stage's manifest
    (``paths.inputs.decontaminate.manifest``) and copied into the output."""
    threads: int = 1
    """torch intra-op threads (recorded: a different count can change results bitwise). The tiny models'
    small matrices gain little from a second thread and lose much when the cores are shared. Set by the
    entry point (``stages/eval.py``), not by the library."""
    seed: int = 0
    """Seeds the global generators (nothing here samples: decoding is greedy). Set by the entry point, and
    the seed each checkpoint's model is built with before its weights are loaded."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "eval") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``eval.text.window`` ...)."""
        if not isinstance(self.stages, tuple) or not self.stages:
            raise RecipeError(f"{where}.stages: list at least one stage whose checkpoints to evaluate")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, str) or not _STAGE_NAME.fullmatch(stage):
                raise RecipeError(f"{where}.stages[{i}]: {stage!r} must be a stage name like 'pretrain'")
            if stage in DATA_ROLES:
                raise RecipeError(
                    f"{where}.stages[{i}]: {stage!r} is a data input role ({', '.join(DATA_ROLES)}), not a stage "
                    "with checkpoints"
                )
        if len(set(self.stages)) != len(self.stages):
            raise RecipeError(f"{where}.stages: {list(self.stages)} lists a stage twice")
        self.text.validate(f"{where}.text")
        self.tasks.validate(f"{where}.tasks")
        _check_relative(self.decontamination_report, f"{where}.decontamination_report", "the repository root")
        check_int(self.threads, f"{where}.threads", minimum=1, maximum=1024)
        check_int(self.seed, f"{where}.seed", minimum=0, maximum=2**32 - 1)


def _check_relative(name: object, key: str, base: str) -> None:
    if not isinstance(name, str) or not name or "\\" in name:
        raise RecipeError(f"{key}: {name!r} must be a non-empty POSIX path relative to {base}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", ".") for part in pure.parts) or pure.as_posix() != name:
        raise RecipeError(
            f"{key}: {name!r} must be a normal relative path under {base} (no leading '/', no '.', '..' or empty "
            "segments)"
        )


__all__ = ["DATA_ROLES", "EvalConfig", "HeldoutTextConfig", "TasksConfig"]
