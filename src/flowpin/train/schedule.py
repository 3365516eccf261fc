"""The learning-rate schedule: a pure function of the step.

``lr_at(cfg, step)`` is all there is -- no ``torch.optim.lr_scheduler`` object, hence no scheduler
state to save or restore: a resumed or forked run recomputes the LR of any step from the recipe. (The
checkpoint still records the LR of its last step, for audit.)

Shape, for ``W = warmup_steps`` and ``T = total_steps``:

* warmup, ``step < W``: linear from ``peak_lr / W`` at step 0 up to ``peak_lr`` at step ``W - 1`` (step 0
  already takes a small, non-zero step instead of wasting a batch at LR 0);
* decay, ``W <= step <= T``: progress ``p = (step - W) / (T - W)`` runs from 0 to 1 and the LR from
  ``peak_lr`` to ``min_lr`` -- cosine (``min + (peak - min) * (1 + cos(pi p)) / 2``), linear, or constant
  (stays at ``peak_lr``; ``min_lr`` is unused);
* after ``T``: held at ``min_lr`` (``peak_lr`` for constant).

Steps are 0-based optimizer steps: a run of ``T`` steps trains steps ``0 .. T-1``, so its last step's LR is
one decay increment above ``min_lr`` and ``lr_at(cfg, T) == min_lr`` (the torchtitan/OLMo-core
convention). Arithmetic is plain Python floats (IEEE double), rounded once to the float the optimizer
receives; ``math.cos`` comes from the platform libm, which the environment fingerprint records.
"""

from __future__ import annotations

import dataclasses
import math

from flowpin.errors import InternalError, RecipeError
from flowpin.recipe import check_choice, check_float, check_int

DECAYS = ("cosine", "linear", "constant")
"""The decay shapes :func:`lr_at` knows."""
MAX_STEPS = 2**53 - 1
"""Largest step count a recipe may name (canonical JSON integers)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The LR schedule (``optim.schedule``). Validated on construction."""

    total_steps: int
    """Step at which the decay reaches ``min_lr`` (usually the run's ``train.steps``); ``>= warmup_steps``."""
    peak_lr: float
    """LR at the end of warmup; ``> 0``."""
    warmup_steps: int = 0
    """Steps of linear warmup (0: start at ``peak_lr``)."""
    min_lr: float = 0.0
    """LR reached at ``total_steps`` (OLMo 3 7B: ``peak_lr / 10``); ``0 <= min_lr <= peak_lr``."""
    decay: str = "cosine"
    """``cosine``, ``linear`` (OLMo 3 midtraining) or ``constant``."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "optim.schedule") -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.total_steps, f"{where}.total_steps", minimum=1, maximum=MAX_STEPS)
        check_int(self.warmup_steps, f"{where}.warmup_steps", minimum=0, maximum=MAX_STEPS)
        peak = check_float(self.peak_lr, f"{where}.peak_lr", minimum=0.0)
        if peak == 0.0:
            raise RecipeError(f"{where}.peak_lr: 0 must be > 0 (a schedule that never moves the weights)")
        check_float(self.min_lr, f"{where}.min_lr", minimum=0.0, maximum=peak)
        check_choice(self.decay, DECAYS, f"{where}.decay")
        if self.warmup_steps > self.total_steps:
            raise RecipeError(
                f"{where}.warmup_steps: {self.warmup_steps} exceeds total_steps {self.total_steps}; "
                "shorten the warmup or lengthen the schedule"
            )


def lr_at(cfg: ScheduleConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under ``cfg``; pure and stateless."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InternalError(f"step must be a non-negative int, got {step!r}")
    warmup, total = cfg.warmup_steps, cfg.total_steps
    peak, low = float(cfg.peak_lr), float(cfg.min_lr)
    if step < warmup:
        return peak * ((step + 1) / warmup)  # the fraction first: exactly peak_lr at step W - 1
    if cfg.decay == "constant":
        return peak
    if step >= total:
        return low
    if step == warmup:
        return peak
    progress = (step - warmup) / (total - warmup)  # in (0, 1): step == warmup and step >= total returned above
    if cfg.decay == "linear":
        return low + (peak - low) * (1.0 - progress)
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
