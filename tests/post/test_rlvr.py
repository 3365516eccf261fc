"""RLVR: prompt selection, seeded prompt batches, group-normalised advantages, the GRPO objective on
hand-made log-probabilities, sampling determinism and the direction of one update on a tiny megatron
GPT, bitwise reproducible and resumable runs through the training loop, recipe refusals.

The slow tests run the real stage script in a scratch project (synth -> tokenize of the synth tasks ->
a 4-step pretrain -> rlvr twice): a signed manifest that verifies, the report, identical checkpoints; and
a third rlvr run killed by a real SIGKILL mid-save, whose rerun resumes and ends on the same bytes.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from flowpin.data.order import MAX_POSITION
from flowpin.data.synth import Task
from flowpin.data.tokenizer import TokenizerConfig, train_tokenizer
from flowpin.errors import DataError, RecipeError
from flowpin.failpoints import ENV as FAILPOINT_ENV
from flowpin.manifest.statement import load_manifest
from flowpin.post.lm import SamplingConfig
from flowpin.post.prompts import Vocab
from flowpin.post.rlvr import (
    Groups,
    GRPOLoss,
    RLVRConfig,
    TaskFilter,
    admitted_tasks,
    group_advantages,
    grpo_objective,
    operations,
    pack_responses,
    prompt_batches,
    quarter_means,
    response_logprobs,
    reward_function,
    sample_seed,
)
from flowpin.post.verifiers import exact_integer
from flowpin.recipe import to_config
from flowpin.train.loop import OptimConfig, TrainConfig
from flowpin.train.schedule import ScheduleConfig
from helpers import BIN, REPO, checked, copy_project, scratch_env
from post_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [
    ("arithmetic", "What is 3 + 4?", "3 + 4 = 7. Answer: 7", "7"),
    ("arithmetic", "What is 12 * 3?", "12 * 3 = 36. Answer: 36", "36"),
    ("arithmetic", "What is 9 - 5 + 2?", "9 - 5 = 4. 4 + 2 = 6. Answer: 6", "6"),
    ("arithmetic", "What is 40 / 8?", "40 / 8 = 5. Answer: 5", "5"),
    ("arithmetic", "What is 8 - 6?", "8 - 6 = 2. Answer: 2", "2"),
    ("word_problem", "Ann has 9 pens and gives 4 to Bo. How many are left?", "9 - 4 = 5. Answer: 5", "5"),
    ("word_problem", "Bo has 4 cups; Cy has 2 times as many. How many in total?", "4 + 4 * 2 = 12. Answer: 12", "12"),
]


def make_tasks() -> list[Task]:
    return [
        Task(id=f"synth/train/{kind}/{i}", kind=kind, prompt=p, solution=s, answer=a)
        for i, (kind, p, s, a) in enumerate(ROWS)
    ]


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return make_tasks()


@pytest.fixture(scope="module")
def vocab(tasks: list[Task]) -> Vocab:
    cfg = TokenizerConfig(
        vocab_size=320, min_frequency=1, special_tokens=("<|endoftext|>", "<|pad|>"), seed=0, train_max_bytes=None
    )
    tok: Tokenizer = train_tokenizer([t.text for t in tasks] * 3, cfg)
    return Vocab(tokenizer=tok, eos_id=0, pad_id=1)


# --- prompts --------------------------------------------------------------------------------------


def test_operations_are_read_from_the_worked_solution(tasks: list[Task]) -> None:
    assert [operations(t) for t in tasks] == [["+"], ["*"], ["-", "+"], ["/"], ["-"], ["-"], ["+", "*"]]
    negative = Task(id="n", kind="arithmetic", prompt="What is 3 - 5?", solution="3 - 5 = -2. Answer: -2", answer="-2")
    assert operations(negative) == ["-"]  # a negative result is not an operation


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"kinds": ("arithmetic", "word_problem")}, [0, 1, 2, 3, 4, 5, 6]),
        ({"kinds": ("arithmetic",), "max_operations": 1}, [0, 1, 3, 4]),
        ({"kinds": ("arithmetic", "word_problem"), "max_operations": 1, "max_answer": 5}, [3, 4, 5]),
        ({"kinds": ("arithmetic", "word_problem"), "operators": ("-", "+")}, [0, 2, 4, 5]),
        ({"kinds": ("word_problem",), "max_answer": 0}, []),
    ],
)
def test_the_filter_selects_by_kind_operations_operators_and_answer(
    tasks: list[Task], selection: dict[str, Any], expected: list[int]
) -> None:
    f = TaskFilter(**selection)
    assert [i for i, t in enumerate(tasks) if f.admits(t)] == expected
    if expected:
        assert admitted_tasks(tasks, f, where="x") == [tasks[i] for i in expected]
    else:
        with pytest.raises(DataError, match=r"data/synth/train: rlvr\.tasks admits none of its 7 tasks; widen"):
            admitted_tasks(tasks, f, where="data/synth/train")


def test_sample_seeds_are_pure_distinct_and_fit_canonical_json() -> None:
    seeds = {sample_seed(s, step, row) for s in (1, 2) for step in range(20) for row in range(8)}
    assert len(seeds) == 2 * 20 * 8
    assert all(0 <= x <= MAX_POSITION for x in seeds)
    assert sample_seed(1, 3, 4) == sample_seed(1, 3, 4) == 5537408234371538  # pinned: the scheme must not drift


def test_prompt_batches_are_a_pure_function_of_the_step(tasks: list[Task], vocab: Vocab) -> None:
    batches = prompt_batches(tasks, vocab, order_seed=5, batch_size=3, seed=9)
    batch = batches(4)
    assert batch.shape == (3, 2, batches.prompts.shape[1]) and batch.dtype == torch.int64
    assert torch.equal(batch, batches(4)) and not torch.equal(batch, batches(5))
    for row, index in enumerate(batches.order.batch(4)):
        ids = vocab.prompt_ids(tasks[index].prompt)
        assert batch[row, 1, 0] == index and batch[row, 1, 2] == len(ids)
        assert batch[row, 0, : len(ids)].tolist() == ids and set(batch[row, 0, len(ids) :].tolist()) <= {vocab.pad_id}
        assert batch[row, 1, 1] == sample_seed(9, 4, row)
    epoch = [
        i
        for step in range(7)
        for i in prompt_batches(tasks, vocab, order_seed=5, batch_size=1, seed=9).order.batch(step)
    ]
    assert sorted(epoch) == list(range(len(tasks)))  # every prompt once per epoch
    other = prompt_batches(tasks[:-1], vocab, order_seed=5, batch_size=3, seed=9)
    assert other.order.dataset_digest != batches.order.dataset_digest  # the prompts key the order


def test_pack_responses_masks_the_response_tokens_only() -> None:
    packed = pack_responses([[5, 6], [7]], [[8, 9, 0], [10]], pad_id=1)
    assert packed[:, 0].tolist() == [[5, 6, 8, 9, 0], [7, 10, 1, 1, 1]]
    assert packed[:, 1].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


# --- advantages and the objective -----------------------------------------------------------------


def test_group_advantages_normalise_each_group_and_zero_uniform_groups() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(0.25 * 0.75)
    expected = [[0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], [0.0] * 4, [0.0] * 4, [1.0, 1.0, -1.0, -1.0]]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(4), atol=1e-5)


def k3(r: float) -> float:
    return math.exp(r) - r - 1


def test_the_objective_on_hand_made_logprobs() -> None:
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, kl = grpo_objective(logp, logp.clone(), mask, adv, kl_coef=0.5)
    # -mean(A * sum(logp) / len) = -((-3 / 2) - (-3 / 1)) / 2 = -0.75; the reference equals the policy: KL 0
    assert math.isclose(float(loss), -0.75, abs_tol=1e-6) and float(kl) == 0.0
    ref = logp - torch.tensor([[0.5, 0.5, 7.0], [-0.5, 7.0, 7.0]])
    expected_kl = (k3(-0.5) + k3(0.5)) / 2
    loss, kl = grpo_objective(logp, ref, mask, adv, kl_coef=0.5)
    assert math.isclose(float(kl), expected_kl, rel_tol=1e-5)
    assert math.isclose(float(loss), -0.75 + 0.5 * expected_kl, rel_tol=1e-5)
    no_kl, _ = grpo_objective(logp, ref, mask, adv, kl_coef=0.0)
    assert math.isclose(float(no_kl), -0.75, abs_tol=1e-6)  # measured, not optimised


def test_quarter_means_compare_the_first_and_last_quarter() -> None:
    curve = [[s, float(s)] for s in range(1, 9)]
    assert quarter_means(curve, 8) == {"steps_per_quarter": 2.0, "first": 1.5, "last": 7.5}
    assert quarter_means([], 8)["first"] is None


def test_top_answer_share_measures_how_often_one_answer_is_given() -> None:
    def groups(*answers: str | None) -> Groups:
        return Groups(packed=torch.zeros((len(answers), 2, 1)), rewards=torch.zeros((1, len(answers))), answers=answers)

    assert groups("1", "1", "7", None).top_answer_share() == 0.5
    assert groups("3", "4", "5", "6").top_answer_share() == 0.25
    assert groups(None, None).top_answer_share() == 0.0


def test_the_reward_is_the_kind_verifier_or_the_named_one(tasks: list[Task]) -> None:
    assert reward_function(None)(tasks[0], "Answer: 7") == 1.0
    assert reward_function(None)(tasks[5], "Answer: 4") == 0.0
    assert reward_function("answer_format")(tasks[0], "Answer: 4") == 1.0
    with pytest.raises(RecipeError, match=r"rlvr\.verifier: unknown verifier 'nope'"):
        reward_function("nope")


# --- on a tiny megatron GPT -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def megatron() -> Iterator[None]:
    """The process a stage's entry point prepares (process group, megatron's CPU patches), undone afterwards."""
    from flowpin.runtime import prepare_environment

    with prepare_environment(seed=0, threads=None):
        yield


def tiny_model(vocab: Vocab, seed: int = 3) -> torch.nn.Module:
    from flowpin.train.transformer import build_model

    model: torch.nn.Module = build_model(tiny_config(vocab.tokenizer.get_vocab_size()), device="cpu", seed=seed)
    return model


def odd_length(task: Task, text: str) -> float:
    """A reward that splits random samples: 1 for an odd number of characters."""
    return float(len(text) % 2)


def grpo_loss(tasks: Sequence[Task], vocab: Vocab, reward: Any = odd_length, kl_coef: float = 0.0) -> GRPOLoss:
    reference = tiny_model(vocab)
    reference.eval()
    reference.requires_grad_(False)
    return GRPOLoss(
        tasks=tasks,
        vocab=vocab,
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
        samples_per_prompt=4,
        reward=reward,
        reference=reference,
        kl_coef=kl_coef,
        max_len=64,
    )


def test_samples_are_a_pure_function_of_the_weights_and_the_batch(
    megatron: None, tasks: list[Task], vocab: Vocab
) -> None:
    model, loss_fn = tiny_model(vocab), grpo_loss(tasks, vocab)
    batches = prompt_batches(tasks, vocab, order_seed=1, batch_size=2, seed=7)
    first = loss_fn.sample(model, batches(0))
    again = loss_fn.sample(model, batches(0))
    assert torch.equal(first.packed, again.packed) and torch.equal(first.rewards, again.rewards)
    assert first.packed.shape[0] == 2 * 4 and first.rewards.shape == (2, 4)
    reseeded = batches(0).clone()
    reseeded[:, 1, 1] += 1  # same prompts, other sampling seeds
    assert not torch.equal(loss_fn.sample(model, reseeded).packed, first.packed)


def test_an_update_raises_the_rewarded_sample_and_lowers_the_other(
    megatron: None, tasks: list[Task], vocab: Vocab
) -> None:
    model, loss_fn = tiny_model(vocab), grpo_loss(tasks, vocab)
    batch = prompt_batches(tasks, vocab, order_seed=1, batch_size=1, seed=7)(0)
    groups = loss_fn.sample(model, batch)
    assert 0 < float(groups.rewards.sum()) < 4, "the test needs a group with mixed rewards"
    adv = group_advantages(groups.rewards).reshape(-1)

    def mean_logprobs() -> torch.Tensor:
        logp, mask = response_logprobs(model, groups.packed)
        return (logp * mask).sum(dim=1) / mask.sum(dim=1)

    before = mean_logprobs().detach()
    with torch.no_grad():
        ref, _ = response_logprobs(loss_fn.reference, groups.packed)
    logp, mask = response_logprobs(model, groups.packed)
    loss, _ = grpo_objective(logp, ref, mask, adv, kl_coef=0.0)
    torch.autograd.backward(loss)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.05)
    change = mean_logprobs().detach() - before
    assert all(float(c) > 0 for c in change[adv > 0]), (adv, change)
    assert all(float(c) < 0 for c in change[adv < 0]), (adv, change)


def test_groups_without_reward_variance_give_no_gradient(megatron: None, tasks: list[Task], vocab: Vocab) -> None:
    model, loss_fn = tiny_model(vocab), grpo_loss(tasks, vocab, reward=lambda task, text: 1.0)
    loss, metrics = loss_fn(model, prompt_batches(tasks, vocab, order_seed=1, batch_size=2, seed=7)(0))
    torch.autograd.backward(loss)
    assert metrics["reward"] == 1.0 and metrics["signal"] == 0.0 and metrics["kl"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def loop_config(steps: int) -> TrainConfig:
    schedule = ScheduleConfig(total_steps=steps, peak_lr=1e-3, decay="constant")
    return TrainConfig(
        steps=steps, batch_size=2, seed=11, log_every=1, checkpoint_every=2, optim=OptimConfig(schedule=schedule)
    )


def train_tiny(run_dir: Path, tasks: Sequence[Task], vocab: Vocab) -> dict[str, bytes]:
    from flowpin.train.run import read_metrics, train_loop

    batches = prompt_batches(tasks, vocab, order_seed=1, batch_size=2, seed=7)
    result = train_loop(
        tiny_model(vocab), loop_config(4), batches=batches, loss_fn=grpo_loss(tasks, vocab), run_dir=run_dir
    )
    assert [c.step for c in result.checkpoints] == [2, 4]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("reward" in r["metrics"] for r in rows)
    last = result.checkpoints[-1].path
    return {f.name: f.read_bytes() for f in sorted(last.iterdir()) if f.name.endswith(".safetensors")}


def test_runs_are_bitwise_reproducible_and_resume_from_a_checkpoint(
    megatron: None, tasks: list[Task], vocab: Vocab, tmp_path: Path
) -> None:
    first = train_tiny(tmp_path / "a", tasks, vocab)
    assert train_tiny(tmp_path / "b", tasks, vocab) == first
    # step 4's checkpoint gone (in process, cheap): the rerun resumes from step 2 and samples steps 3 and 4
    # again. A real SIGKILL of the stage script: test_a_run_killed_by_sigkill_resumes_to_the_bytes_of_an_...
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000004")
    assert train_tiny(tmp_path / "b", tasks, vocab) == first


# --- recipe ---------------------------------------------------------------------------------------


def reference_block() -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.load(REPO / "params" / "rlvr.yaml"), resolve=True)
    assert isinstance(plain, dict)
    block: dict[str, Any] = plain["rlvr"]
    return block


def test_the_reference_recipe_loads() -> None:
    cfg = to_config(RLVRConfig, reference_block(), where="rlvr")
    assert cfg.samples_per_prompt >= 2 and cfg.sampling.temperature > 0
    assert cfg.loop.optim.schedule.total_steps == cfg.loop.steps and cfg.loop.log_every == 1
    assert set(cfg.eval.kinds) <= set(cfg.tasks.kinds)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"samples_per_prompt": 1}, r"rlvr\.samples_per_prompt: 1 must be in 2\.\."),
        ({"sampling": {"temperature": 0.0}}, r"rlvr\.sampling\.temperature: 0 \(greedy\) makes the K samples"),
        ({"kl_coef": -0.1}, r"rlvr\.kl_coef: -0\.1 must be within"),
        ({"verifier": "regex"}, r"rlvr\.verifier: unknown verifier 'regex'; known: answer_format, exact_integer"),
        ({"tasks": {"kinds": ["poetry"]}}, r"rlvr\.tasks\.kinds: 'poetry' is not one of"),
        ({"tasks": {"operators": ["%"]}}, r"rlvr\.tasks\.operators\[0\]: '%' is not one of"),
        ({"tasks": {"operators": ["+", "+"]}}, r"rlvr\.tasks\.operators: .* lists an operator twice"),
        ({"tasks": {"max_answer": -1}}, r"rlvr\.tasks\.max_answer: -1 must be"),
        (
            {"tasks": {"kinds": ["arithmetic"]}},
            r"rlvr\.eval\.kinds: \['word_problem'\] are not among rlvr\.tasks\.kinds",
        ),
        ({"order_seed": -1}, r"rlvr\.order_seed: -1 must be in"),
        ({"group_size": 8}, r"rlvr\.group_size: unknown key"),
    ],
)
def test_recipe_refusals(change: dict[str, Any], message: str) -> None:
    block = {**reference_block(), **change}
    with pytest.raises(RecipeError, match=message):
        to_config(RLVRConfig, block, where="rlvr")


def test_exact_integer_is_the_default_reward_of_both_kinds(tasks: list[Task]) -> None:
    cfg = to_config(RLVRConfig, reference_block(), where="rlvr")
    assert cfg.verifier is None
    for task in tasks:
        assert reward_function(None)(task, task.solution) == exact_integer(task, task.solution) == 1.0


# --- end to end: the real stage script in a scratch project (slow) --------------------------------


def rlvr_args(name: str) -> list[str]:
    return [
        "paths.inputs.init.data=runs/pretrain/checkpoints",
        "paths.inputs.init.manifest=manifests/pretrain.json",
        "rlvr.tasks.max_operations=0",
        "rlvr.tasks.max_answer=null",
        "rlvr.samples_per_prompt=2",
        "rlvr.sampling.max_new_tokens=8",
        "rlvr.loop.steps=4",
        "rlvr.loop.batch_size=2",
        "rlvr.loop.checkpoint_every=2",
        "rlvr.eval.tasks=2",
        "rlvr.eval.max_new_tokens=8",
        f"paths.out=runs/{name}/checkpoints",
        f"paths.report=reports/{name}.json",
        f"paths.manifest=manifests/{name}.json",
    ]


@pytest.fixture(scope="module")
def flow(post_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synth -> tokenize (of the synth tasks) -> a 4-step pretrain (helpers.POST_UPSTREAM, built once per session:
    conftest.py ``post_flow``), the init of a short RLVR run, then that run."""
    root = copy_project(post_flow, tmp_path_factory.mktemp("rlvr") / "p")
    checked(root, sys.executable, "stages/rlvr.py", *rlvr_args("rlvr"))
    return root


def subjects(root: Path, name: str) -> dict[str, str]:
    return {
        s["name"]: s["digest"]["flowpinSha256"] for s in load_manifest(root / "manifests" / f"{name}.json").subjects
    }


@pytest.mark.slow
def test_the_rlvr_stage_signs_its_checkpoints_and_reports_the_reward_curve(flow: Path) -> None:
    checked(flow, str(BIN / "flowpin"), "verify", "manifests/rlvr.json")
    assert sorted(subjects(flow, "rlvr")) == [
        "runs/rlvr/checkpoints/model.json",
        "runs/rlvr/checkpoints/step-000002",
        "runs/rlvr/checkpoints/step-000004",
    ]
    deps = {d["name"]: d["annotations"]["kind"] for d in load_manifest(flow / "manifests" / "rlvr.json").dependencies}
    for parent in ("manifests/pretrain.json", "manifests/synth.json", "manifests/tokenize.json"):
        assert deps[parent] == "manifest"
    assert deps["runs/pretrain/checkpoints"] == "checkpoint" and deps["data/synth"] == "dataset"
    report = json.loads((flow / "reports" / "rlvr.json").read_text())
    assert report["steps"] == 4 and [s for s, _ in report["reward"]["curve"]] == [1, 2, 3, 4]
    assert set(report["reward_quarters"]) == {"steps_per_quarter", "first", "last"}
    assert set(report["heldout"]["before"]) == set(report["heldout"]["after"]) == {"arithmetic", "word_problem"}
    assert report["kl"]["last"] is not None and report["tasks"]["verifier"]["arithmetic"] == "exact_integer"


@pytest.mark.slow
def test_a_second_rlvr_run_gives_the_same_checkpoints(flow: Path) -> None:
    checked(flow, sys.executable, "stages/rlvr.py", *rlvr_args("rlvr2"))
    first, second = subjects(flow, "rlvr"), subjects(flow, "rlvr2")
    for step in ("step-000002", "step-000004"):
        assert first[f"runs/rlvr/checkpoints/{step}"] == second[f"runs/rlvr2/checkpoints/{step}"]


@pytest.mark.slow
def test_a_run_killed_by_sigkill_resumes_to_the_bytes_of_an_uninterrupted_run(flow: Path) -> None:
    # A real SIGKILL (flowpin.failpoints): the stage kills itself while writing step 4's first tensor
    # file, after step 2's checkpoint was published. No handler, no finally block runs.
    env = {**scratch_env(flow), FAILPOINT_ENV: "checkpoint.before-file:step-000004@1"}
    argv = [sys.executable, "stages/rlvr.py", *rlvr_args("killed")]
    killed = subprocess.run(argv, cwd=flow, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    out = flow / "runs" / "killed" / "checkpoints"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002"]
    assert [p.name for p in out.glob(".step-000004.*")], "the kill left no half-written step 4"
    assert not (flow / "manifests" / "killed.json").exists()

    checked(flow, sys.executable, "stages/rlvr.py", *rlvr_args("killed"))
    report = json.loads((flow / "reports" / "killed.json").read_text())
    assert report["resumed_from"] == "step-000002"
    assert not list(out.glob(".*")), "the rerun left temporaries behind"
    whole, resumed = subjects(flow, "rlvr"), subjects(flow, "killed")
    for step in ("step-000002", "step-000004"):  # every file of both checkpoints, bit for bit
        assert resumed[f"runs/killed/checkpoints/{step}"] == whole[f"runs/rlvr/checkpoints/{step}"], step
