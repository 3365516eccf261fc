"""Where this process sits in a ``torchrun`` world, read without importing torch.

The one reader of the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):

* :func:`launcher_env` parses and checks it; :func:`flowpin.train.distributed.init_distributed` joins the
  process group from it.
* :func:`process_rank` says which rank of how many this process is: the process group's when one exists,
  else the launcher's, else rank 0 of 1. :func:`flowpin.stage.stage_run` asks it who records a stage (rank
  0 alone), so data stages, which never load torch, need not import it for that.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from flowpin.errors import FlowpinError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""The variables ``torchrun`` sets for each worker (with ``MASTER_ADDR``/``MASTER_PORT``)."""


def launcher_env(environ: Mapping[str, str]) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the launcher's variables in ``environ``; ``None`` without any.

    Raises :class:`FlowpinError` when some are set but ``RANK`` or ``WORLD_SIZE`` is missing, when one is not
    an integer, or when they do not fit together (``0 <= RANK < WORLD_SIZE``).
    """
    present = [name for name in LAUNCHER_VARS if name in environ]
    if not present:
        return None
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
    if missing:
        raise FlowpinError(
            f"launcher environment incomplete: {', '.join(present)} set but {', '.join(missing)} missing; "
            "start with torchrun, or unset them to train as a single process"
        )
    values = {}
    for name in LAUNCHER_VARS:
        raw = environ.get(name, "0")
        try:
            values[name] = int(raw)
        except ValueError as exc:
            raise FlowpinError(f"launcher environment: {name}={raw!r} is not an integer") from exc
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise FlowpinError(f"launcher environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} is inconsistent")
    return rank, world, local


def process_rank(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the default process group's when one is initialised (it can
    only be if ``torch.distributed`` was imported, so torch is never imported here), else the launcher's
    (``environ``, default ``os.environ``), else ``(0, 1)``."""
    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        return int(tdist.get_rank()), int(tdist.get_world_size())
    launched = launcher_env(os.environ if environ is None else environ)
    return (0, 1) if launched is None else (launched[0], launched[1])
