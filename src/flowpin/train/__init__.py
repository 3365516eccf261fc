"""Training engine: the model and the process around it (stages 6-8: pretrain, midtrain, long context).

* :mod:`flowpin.train.transformer` -- :class:`~flowpin.train.transformer.ModelConfig` (recipe group ``model``), the
  mapping onto megatron-core's ``TransformerConfig``, building the ``GPTModel`` (local spec on CPU,
  Transformer Engine spec on GPU), parameter counts, and the precision rules (FP8 is refused where it
  could not really be used; the effective precision is read back from the built model).
* :mod:`flowpin.train.megatron_cpu` -- the reviewed replacements of megatron-core's CUDA-only code, applied
  only without CUDA and named in the manifest; megatron's named RNG streams for checkpoints.
* :mod:`flowpin.train.distributed` -- the only place with process-wide side effects: process group,
  megatron parallel state (TP = PP = 1, data parallel), seeding and deterministic kernels.
* :mod:`flowpin.train.launcher` -- the only reader of ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, and which rank
  this process is (torch-free: stage recording asks it who records).
* :mod:`flowpin.train.schedule` -- the learning rate as a pure function of the step (warmup + cosine/linear).
* :mod:`flowpin.train.checkpoint` -- full training state in safetensors + canonical JSON (no pickle),
  self-describing and digest-checked, published atomically.
* :mod:`flowpin.train.loop` -- the deterministic, resumable, forkable loop over the exact data order.
* :mod:`flowpin.train.cpu_warnings` -- megatron's warnings that are expected on the CPU reference path (no
  Transformer Engine, no Apex), filtered by exact message and module, and the one line that replaces them.

Nothing here imports megatron at import time (on a GPU machine that imports Transformer Engine and starts
CUDA); the functions that need it import it. Importing the package installs the filters of
:mod:`~flowpin.train.cpu_warnings` (torch-free), so they are in place before any of them does.
"""

from flowpin.train.cpu_warnings import filter_expected_warnings

filter_expected_warnings()
