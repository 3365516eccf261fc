"""The one body of every training stage script: recipe -> prepared process -> spec -> run -> manifest.

``stages/train.py`` (pretrain, midtrain, long context), ``stages/sft.py``, ``stages/dpo.py`` and
``stages/rlvr.py`` each keep their own ``@hydra.main`` (DVC and Hydra need a script per stage) and call
:func:`run_training_stage` with their :class:`~flowpin.train.spec.TrainingStage`; ``flowpin fork``
(:mod:`flowpin.replay.fork`) calls it too, with the :class:`~flowpin.stage.StageInvocation` that says what
it composed. The body:

1. :func:`flowpin.stage.stage_run` checks the recipe and paths and records the stage (a signed manifest
   declaring every upstream input, a tracker, the report), rank 0 only;
2. inside it, :func:`flowpin.runtime.prepare_environment` prepares the process from the recipe's
   ``loop.seed`` and ``threads`` (determinism, process group, megatron's CPU patches) and undoes it at the
   end;
3. the stage's spec builder turns the recipe and the input directories into a
   :class:`~flowpin.train.spec.TrainSpec`, and :func:`flowpin.train.run.run_spec` runs it into the run
   directory (the parent of ``paths.out``), keyed by the stage's ``dvc.yaml`` code deps and
   ``FLOWPIN_STALE_CHECKPOINTS`` (:meth:`flowpin.stage.StageRun.run_claim`);
4. the manifest's subjects: ``checkpoints/model.json``, the spec's files, every checkpoint;
5. rank 0 prints the spec's summary lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from omegaconf import DictConfig

from flowpin.constants import MODEL_CONFIG
from flowpin.errors import InternalError
from flowpin.recipe import StagePaths
from flowpin.runtime import Runtime, prepare_environment
from flowpin.stage import StageInvocation, stage_run
from flowpin.train.run import TrainingResult, run_spec
from flowpin.train.spec import C, StageContext, TrainingStage


def run_training_stage(
    cfg: DictConfig,
    stage: TrainingStage[C],
    *,
    root: Path,
    invocation: StageInvocation | None = None,
    env: Mapping[str, str] | None = None,
) -> TrainingResult:
    """Run and record one training stage from its composed recipe ``cfg`` (see the module docstring).

    ``invocation`` (``flowpin fork``): the stage was not started by ``@hydra.main``; ``env``: environment
    variables set while the process is prepared (the recipe's ``hydra.job.env_set``, which a Hydra run of the
    stage applies itself). Returns what the stage produced, on every rank.
    """

    def environment(recipe: C) -> AbstractContextManager[Runtime]:
        return prepare_environment(seed=recipe.loop.seed, threads=recipe.threads, env=env)

    with stage_run(
        stage.block,
        cfg,
        stage.config,
        root=root,
        inputs=stage.inputs,
        persistent_out=True,
        environment=environment,
        invocation=invocation,
        preflight=None if stage.preflight is None else _preflight(stage.preflight),
    ) as run:
        if run.runtime is None:
            raise InternalError("run_training_stage: stage_run yielded no prepared process")
        dist = run.runtime.dist
        run_dir = run.out_dir.parent
        inputs = {role: run.input_dir(role) for role in run.paths.inputs}
        spec = stage.build(run.recipe, StageContext(inputs=inputs, run_dir=run_dir, dist=dist))
        result = run_spec(
            spec,
            run_dir=run_dir,
            dist=dist,
            determinism=run.runtime.determinism,
            tracker=run.tracker,
            claim=run.run_claim(),  # the run key's code: this stage's dvc.yaml code deps
        )
        run.rec.output(run.out_dir / MODEL_CONFIG)  # the architecture the checkpoints load into
        for path in (*result.outputs, *(c.path for c in result.checkpoints)):  # every checkpoint is a subject
            run.rec.output(path)
        run.report = dict(result.report)
    if dist.is_main:  # rank 0 recorded the stage and reports it
        for line in spec.summary(str(run.paths.manifest), result.report):
            print(line)
    return result


def _preflight(check: Callable[[C], None]) -> Callable[[C, StagePaths], None]:
    def preflight(recipe: C, paths: StagePaths) -> None:
        check(recipe)

    return preflight
