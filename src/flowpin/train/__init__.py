"""Training engine: one training spec, one runner, one loop, one stage body -- for every training stage.

Every training stage -- pretrain, midtrain, long context (stages 6-8), SFT, DPO, RLVR (stages 9-11,
:mod:`flowpin.post`) and a fork of a run (``flowpin fork``) -- is a spec builder returning a
:class:`~flowpin.train.spec.TrainSpec`, run by the same code:

* :mod:`flowpin.train.spec` -- the training spec (pure data and callables: model, loop config, batches,
  loss, run-key parts, evaluation before and after, the stage's report and summary) and
  :class:`~flowpin.train.spec.TrainingStage`, what a stage script hands the stage body.
* :mod:`flowpin.train.entry` -- the one stage body every training stage script (and ``flowpin fork``) calls:
  record the stage, prepare the process, build the spec, run it, declare the outputs.
* :mod:`flowpin.train.run` -- the one runner (:func:`~flowpin.train.run.run_spec`): open the run, evaluate,
  train through the loop, evaluate, report; and a finished run's checkpoint as a model (eval, references).
* :mod:`flowpin.train.run_key` -- the run key: what a run's checkpoints were trained from, when they resume,
  and what becomes of checkpoints trained under another key.
* :mod:`flowpin.train.pretrain` -- the pretraining-style stages' spec builder (the ``train`` block, next-token
  loss, probe loss) and the fork's.
* :mod:`flowpin.train.loop` -- the deterministic, resumable, forkable loop over the exact data order.
* :mod:`flowpin.train.checkpoint` -- full training state in safetensors + canonical JSON (no pickle),
  self-describing and digest-checked, published atomically.
* :mod:`flowpin.train.schedule` -- the learning rate as a pure function of the step (warmup + cosine/linear).
* :mod:`flowpin.train.transformer` -- :class:`~flowpin.train.transformer.ModelConfig` (recipe group ``model``), the
  mapping onto megatron-core's ``TransformerConfig``, building the ``GPTModel`` (local spec on CPU,
  Transformer Engine spec on GPU), parameter counts, and the precision rules (FP8 is refused where it
  could not really be used; the effective precision is read back from the built model).
* :mod:`flowpin.train.megatron_ddp` -- megatron-core's ``DistributedDataParallel`` as the loop's gradient engine.
* :mod:`flowpin.train.distributed` -- the process-wide primitives (process group, megatron parallel state with
  TP = PP = 1, seeding and deterministic kernels) and the loop's collectives; entry points use the primitives
  through :func:`flowpin.runtime.prepare_environment` only.
* :mod:`flowpin.train.megatron_cpu` -- the reviewed replacements of megatron-core's CUDA-only code, applied
  only without CUDA (by the entry point, for the stage's duration) and named in the manifest; megatron's named
  RNG streams for checkpoints.
* :mod:`flowpin.train.launcher` -- the only reader of ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, and which rank
  this process is (torch-free: stage recording asks it who records).
* :mod:`flowpin.train.step_batch` -- which data a training step saw (``flowpin batch``).
* :mod:`flowpin.train.cpu_warnings` -- megatron's warnings that are expected on the CPU reference path (no
  Transformer Engine, no Apex), filtered by exact message and module, and the one line that replaces them.

Nothing here imports megatron at import time (on a GPU machine that imports Transformer Engine and starts
CUDA); the functions that need it import it. Importing the package installs the filters of
:mod:`~flowpin.train.cpu_warnings` (torch-free), so they are in place before any of them does.
"""

from flowpin.train.cpu_warnings import filter_expected_warnings

filter_expected_warnings()
