"""DPO: the objective on hand-made log-probabilities, response-only masks, pair building, recipe refusals.

The slow tests run the real stage scripts in a scratch project (synth -> tokenize of the synth tasks ->
a 4-step pretrain -> sft -> dpo, ~1 min on 2 cores): signed manifests with their lineage, the pairs'
quality gap, and a second DPO run reproducing the pairs and checkpoints byte for byte. On the same flow,
SFT under torchrun (2 ranks): rank 0 alone records it, a later edit to code the stage does not run resumes
its checkpoints, and a recipe change is refused with the checkpoints kept (~1 min).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import flowpin.post.dpo as dpo
from flowpin.data.synth import Task, load_tasks, verify_answer
from flowpin.errors import DataError, RecipeError
from flowpin.manifest.statement import load_manifest
from flowpin.post.dpo import (
    DPOConfig,
    Pair,
    PairsConfig,
    build_pairs,
    dpo_loss,
    dpo_objective,
    pair_examples,
    pair_rewards,
    sample_tasks,
)
from flowpin.post.lm import SamplingConfig
from flowpin.post.prompts import Vocab
from flowpin.recipe import to_config
from helpers import BIN, POST_UPSTREAM, REPO, checked, copy_project, scratch_env
from post_helpers import TableLM, make_tasks, make_vocab, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return make_tasks()


@pytest.fixture(scope="module")
def vocab(tasks: list[Task]) -> Vocab:
    return make_vocab(tasks)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- the objective --------------------------------------------------------------------------------


def test_equal_policy_and_reference_give_log_2_and_no_accuracy() -> None:
    loss, metrics = dpo_objective(t(-3.0, -7.0), t(-5.0, -1.0), t(-3.0, -7.0), t(-5.0, -1.0), beta=0.1)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
    assert metrics == {"reward_accuracy": 0.0, "reward_margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}


def test_dpo_values_on_hand_made_logprobs() -> None:
    # pair 0: chosen up by 1, rejected down by 1 -> margin beta*2 = 1; pair 1: the other way round -> -1
    policy_c, policy_r = t(-9.0, -11.0), t(-21.0, -19.0)
    ref_c, ref_r = t(-10.0, -10.0), t(-20.0, -20.0)
    loss, metrics = dpo_objective(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["reward_margin"] == 0.0
    loss0, m0 = dpo_objective(policy_c[:1], policy_r[:1], ref_c[:1], ref_r[:1], beta=0.5)
    assert math.isclose(float(loss0), math.log1p(math.exp(-1.0)), rel_tol=1e-6)
    assert m0 == {"reward_accuracy": 1.0, "reward_margin": 1.0, "chosen_reward": 0.5, "rejected_reward": -0.5}


def test_the_gradient_raises_chosen_and_lowers_rejected() -> None:
    pc, pr = t(-4.0).requires_grad_(), t(-4.0).requires_grad_()
    loss, _ = dpo_objective(pc, pr, t(-4.0), t(-4.0), beta=2.0)
    torch.autograd.backward(loss)
    assert pc.grad is not None and pr.grad is not None
    assert math.isclose(float(pc.grad), -1.0, rel_tol=1e-6)  # -beta * sigmoid(0) = -1
    assert math.isclose(float(pr.grad), 1.0, rel_tol=1e-6)


def pairs_of(tasks: Sequence[Task]) -> list[Pair]:
    return [
        Pair(task_id=x.id, prompt=x.prompt, answer=x.answer, chosen=x.solution, rejected="1 + 1 = 2. Answer: 2")
        for x in tasks
    ]


def test_pair_examples_share_the_prompt_and_mask_the_responses(vocab: Vocab, tasks: list[Task]) -> None:
    pairs = pairs_of(tasks[:3])
    examples = pair_examples(pairs, vocab, seq_len=48)
    assert examples.shape == (3, 4, 48)
    for pair, ex in zip(pairs, examples, strict=True):
        n = len(vocab.prompt_ids(pair.prompt))
        assert torch.equal(ex[0, :n], ex[2, :n]) and not ex[1, :n].any() and not ex[3, :n].any()
        assert ex[0][ex[1].bool()].tolist() == vocab.response_ids(pair.chosen)
        assert ex[2][ex[3].bool()].tolist() == vocab.response_ids(pair.rejected)
    with pytest.raises(DataError, match=r"dpo\.seq_len \(synth/train/arithmetic/2, chosen\)"):
        pair_examples(pairs[2:], vocab, seq_len=20)
    long = [dataclasses.replace(pairs[0], rejected="1 + 1 = 2. " * 9 + "Answer: 2")]
    with pytest.raises(DataError, match=r"dpo\.seq_len \(synth/train/arithmetic/0, rejected\)"):
        pair_examples(long, vocab, seq_len=48)
    with pytest.raises(DataError, match="no preference pair survived"):
        pair_examples([], vocab, seq_len=48)


def test_dpo_loss_counts_only_response_tokens_and_leaves_the_reference_alone(vocab: Vocab, tasks: list[Task]) -> None:
    examples = pair_examples(pairs_of(tasks[:2]), vocab, seq_len=48)
    width = vocab.tokenizer.get_vocab_size()
    policy, reference = TableLM(width, 48, seed=1), TableLM(width, 48, seed=2)
    reference.requires_grad_(False)
    loss_fn = dpo_loss(reference, beta=0.1)
    loss, metrics = loss_fn(policy, examples)
    assert set(metrics) == {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
    torch.autograd.backward(loss)
    grad = policy.table.grad
    assert grad is not None
    prompt = min(len(vocab.prompt_ids(p.prompt)) for p in pairs_of(tasks[:2]))
    assert grad[: prompt - 1].abs().sum() == 0  # positions predicting prompt tokens carry no gradient
    with torch.no_grad():
        policy.table[: prompt - 1] += 4.0
        reference.table[: prompt - 1] -= 4.0
        policy.table[40:] += 9.0  # padding positions
    assert torch.equal(loss_fn(policy, examples)[0], loss.detach())
    # policy == reference: log 2 whatever the logits
    same = loss_fn(reference, examples)[0]
    assert math.isclose(float(same), math.log(2), rel_tol=1e-6)
    rewards = pair_rewards(reference, reference, examples, beta=0.1)
    assert rewards == {"reward_accuracy": 0.0, "reward_margin": 0.0}


# --- pairs ----------------------------------------------------------------------------------------


def test_sample_tasks_is_seeded_and_keeps_dataset_order(tasks: list[Task]) -> None:
    a = sample_tasks(tasks, 3, seed=1)
    assert a == sample_tasks(tasks, 3, seed=1) and len(a) == 3
    assert [tasks.index(x) for x in a] == sorted(tasks.index(x) for x in a)
    assert any(sample_tasks(tasks, 3, seed=s) != a for s in range(2, 6))
    assert sample_tasks(tasks, 100, seed=1) == tasks


def test_build_pairs_keeps_only_incorrect_samples(
    vocab: Vocab, tasks: list[Task], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_generate(model: Any, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[list[int]]:
        assert kwargs["generator"] is not None and kwargs["cfg"].temperature == 0.7
        out = []
        for prompt in prompts:
            task = next(x for x in tasks if vocab.prompt_ids(x.prompt) == list(prompt))
            n = int(task.id.rsplit("/", 1)[1])
            text = [task.solution, "", "Answer: 999", "7 " * 60 + "Answer: 1", "x = 1.\nAnswer: 1", "Answer: 3"][n]
            out.append([*vocab.tokenizer.encode(text).ids, vocab.eos_id])
        return out

    monkeypatch.setattr(dpo, "generate", fake_generate)
    cfg = PairsConfig(seed=3, prompts=10, batch_size=4, sampling=SamplingConfig(temperature=0.7))
    made = build_pairs(torch.nn.Identity(), tasks, vocab, cfg, seq_len=48, max_len=64)
    assert made.prompts == 6
    assert made.dropped == {"correct": 1, "empty": 1, "too_long": 1}
    assert [p.rejected for p in made.pairs] == ["Answer: 999", "x = 1.", "Answer: 3"]
    for pair in made.pairs:
        task = next(x for x in tasks if x.id == pair.task_id)
        assert pair.chosen == task.solution and verify_answer(task, pair.chosen)
        assert not verify_answer(task, pair.rejected)  # the quality gap: every rejected answer is wrong
    assert made.summary()["weak_pass_rate"] == 1 / 6
    assert made.jsonl().count(b"\n") == 3 and b'"rejected":"Answer: 999"' in made.jsonl()


@pytest.fixture(scope="module")
def megatron() -> Iterator[None]:
    """The process a stage's entry point prepares (process group, megatron's CPU patches), undone afterwards."""
    from flowpin.runtime import prepare_environment

    with prepare_environment(seed=0, threads=None):
        yield


def test_pairs_from_a_real_model_are_seeded(megatron: None, vocab: Vocab, tasks: list[Task]) -> None:
    from flowpin.train.transformer import build_model

    weak = build_model(tiny_config(vocab.tokenizer.get_vocab_size()), device="cpu", seed=5)
    weak.eval()

    def make(seed: int) -> bytes:
        cfg = PairsConfig(seed=seed, prompts=6, batch_size=4, sampling=SamplingConfig(max_new_tokens=12))
        return build_pairs(weak, tasks, vocab, cfg, seq_len=64, max_len=64).jsonl()

    first = make(11)
    assert first and first == make(11)  # same seed, same bytes
    assert make(12) != first  # another seed samples other answers


# --- recipe ---------------------------------------------------------------------------------------


def reference_block() -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.load(REPO / "params" / "dpo.yaml"), resolve=True)
    assert isinstance(plain, dict)
    block: dict[str, Any] = plain["dpo"]
    return block


def test_the_reference_recipe_loads() -> None:
    cfg = to_config(DPOConfig, reference_block(), where="dpo")
    assert cfg.beta > 0 and cfg.pairs.sampling.temperature > 0
    assert cfg.loop.optim.schedule.total_steps == cfg.loop.steps


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"beta": 0}, r"dpo\.beta: must be > 0"),
        ({"beta": -1.0}, r"dpo\.beta: -1(\.0)? must be within"),
        ({"pairs": {"seed": 1, "prompts": 0}}, r"dpo\.pairs\.prompts: 0 must be"),
        ({"pairs": {"seed": 1}}, r"dpo\.pairs\.prompts: missing required key"),
        ({"pairs": {"seed": 1, "prompts": 4, "kinds": ["x"]}}, r"dpo\.pairs\.kinds: 'x' is not one of"),
        ({"pairs": {"seed": 1, "prompts": 4, "sampling": {"temperature": -1}}}, r"sampling\.temperature"),
        ({"reference": "runs/sft"}, r"dpo\.reference: unknown key"),
    ],
)
def test_recipe_refusals(change: dict[str, Any], message: str) -> None:
    block = {**reference_block(), **change}
    with pytest.raises(RecipeError, match=message):
        to_config(DPOConfig, block, where="dpo")


# --- end to end: the real stage scripts in a scratch project (slow) -------------------------------

SMALL = {  # a scratch flow in seconds: synth -> tokenize (of the synth tasks) -> pretrain -> sft -> dpo
    **POST_UPSTREAM,  # synth, tokenize, pretrain: built once per session (conftest.py post_flow)
    "stages/sft.py": [
        "paths.inputs.init.data=runs/pretrain/checkpoints",
        "paths.inputs.init.manifest=manifests/pretrain.json",
        "sft.seq_len=64",
        "sft.loop.steps=4",
        "sft.loop.batch_size=4",
        "sft.loop.checkpoint_every=2",
        "sft.loop.log_every=1",
        "sft.loop.optim.schedule.warmup_steps=1",
        "sft.eval.tasks=4",
        "sft.eval.max_new_tokens=8",
    ],
}


def dpo_args(name: str) -> list[str]:
    return [
        "dpo.loop.steps=4",
        "dpo.loop.batch_size=2",
        "dpo.loop.checkpoint_every=2",
        "dpo.loop.log_every=1",
        "dpo.loop.optim.schedule.warmup_steps=1",
        "dpo.pairs.prompts=8",
        "dpo.pairs.sampling.max_new_tokens=12",
        "dpo.eval.tasks=4",
        "dpo.eval.max_new_tokens=8",
        f"paths.out=runs/{name}/checkpoints",
        f"paths.report=reports/{name}.json",
        f"paths.manifest=manifests/{name}.json",
    ]


@pytest.fixture(scope="module")
def flow(post_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_project(post_flow, tmp_path_factory.mktemp("post") / "p")  # SMALL's POST_UPSTREAM part, run
    checked(root, sys.executable, "stages/sft.py", *SMALL["stages/sft.py"])
    checked(root, sys.executable, "stages/dpo.py", *dpo_args("dpo"))
    return root


def subjects(root: Path, name: str) -> dict[str, str]:
    return {
        s["name"]: s["digest"]["flowpinSha256"] for s in load_manifest(root / "manifests" / f"{name}.json").subjects
    }


@pytest.mark.slow
def test_sft_and_dpo_stages_sign_manifests_with_their_lineage(flow: Path) -> None:
    checked(flow, str(BIN / "flowpin"), "verify", "manifests/sft.json", "manifests/dpo.json")
    assert sorted(subjects(flow, "sft")) == [
        "runs/sft/checkpoints/model.json",
        "runs/sft/checkpoints/step-000002",
        "runs/sft/checkpoints/step-000004",
    ]
    assert "runs/dpo/pairs.jsonl" in subjects(flow, "dpo")
    deps = {d["name"]: d["annotations"]["kind"] for d in load_manifest(flow / "manifests" / "dpo.json").dependencies}
    for parent in ("manifests/sft.json", "manifests/pretrain.json", "manifests/synth.json", "manifests/tokenize.json"):
        assert deps[parent] == "manifest"
    assert {"runs/sft/checkpoints", "runs/pretrain/checkpoints", "data/synth", "data/tokenize"} <= set(deps)
    lineage = checked(flow, str(BIN / "flowpin"), "lineage", "manifests/dpo.json")
    assert "synth" in lineage and "sft" in lineage
    sft_report = json.loads((flow / "reports" / "sft.json").read_text())
    assert sft_report["steps"] == 4 and sft_report["loss"]["last"] is not None
    assert set(sft_report["heldout"]["before"]) == set(sft_report["heldout"]["after"]) == {"arithmetic"}
    dpo_report = json.loads((flow / "reports" / "dpo.json").read_text())
    assert dpo_report["pairs"]["pairs"] >= 1 and dpo_report["steps"] == 4
    assert {"reward_accuracy", "reward_margin"} <= set(dpo_report["train_pair_rewards"])


@pytest.mark.slow
def test_every_rejected_answer_is_wrong_and_every_chosen_one_verifies(flow: Path) -> None:
    tasks = {x.id: x for x in load_tasks(flow / "data" / "synth" / "train")}
    lines = (flow / "runs" / "dpo" / "pairs.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        pair = json.loads(line)
        task = tasks[pair["task_id"]]
        assert pair["chosen"] == task.solution and verify_answer(task, pair["chosen"])
        assert not verify_answer(task, pair["rejected"])


@pytest.mark.slow
def test_a_second_dpo_run_gives_the_same_pairs_and_checkpoints(flow: Path) -> None:
    checked(flow, sys.executable, "stages/dpo.py", *dpo_args("dpo2"))
    first, second = subjects(flow, "dpo"), subjects(flow, "dpo2")
    assert first["runs/dpo/pairs.jsonl"] == second["runs/dpo2/pairs.jsonl"]
    for step in ("step-000002", "step-000004"):
        assert first[f"runs/dpo/checkpoints/{step}"] == second[f"runs/dpo2/checkpoints/{step}"]


# --- SFT under torchrun: rank 0 alone records; an unrelated code change resumes, a recipe change is refused ---

SFT_DP = [  # SMALL's sft, two steps, one checkpoint
    "paths.inputs.init.data=runs/pretrain/checkpoints",
    "paths.inputs.init.manifest=manifests/pretrain.json",
    "sft.seq_len=64",
    "sft.loop.batch_size=4",
    "sft.loop.checkpoint_every=2",
    "sft.loop.log_every=1",
    "sft.loop.optim.schedule.warmup_steps=1",
    "sft.eval.tasks=1",
    "sft.eval.max_new_tokens=2",
    "paths.out=runs/sft-dp/checkpoints",
    "paths.report=reports/sft-dp.json",
    "paths.manifest=manifests/sft-dp.json",
]


def aim_runs(root: Path) -> int:
    chunks = root / ".aim" / "meta" / "chunks"  # one directory per Aim run
    return len(list(chunks.iterdir())) if chunks.is_dir() else 0


@pytest.mark.slow
def test_sft_under_torchrun_records_once_and_resumes_across_an_unrelated_code_change(flow: Path) -> None:
    # the scratch project's own flowpin runs (not the checkout's), so an edit to it is an edit to the code that ran
    env = {**scratch_env(flow), "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(flow / "src"), "OMP_NUM_THREADS": "1"}
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1"]
    torchrun = [str(BIN / "torchrun"), "--nnodes=1", "--nproc-per-node=2", *rdzv]
    launch = [*torchrun, "stages/sft.py", *SFT_DP, "sft.loop.steps=2"]

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=flow, env=env, capture_output=True, text=True, timeout=300, check=False)

    manifests, reports = set(os.listdir(flow / "manifests")), set(os.listdir(flow / "reports"))
    runs = aim_runs(flow)
    proc = run(launch)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert set(os.listdir(flow / "manifests")) - manifests == {"sft-dp.json"}
    assert set(os.listdir(flow / "reports")) - reports == {"sft-dp.json"}
    assert aim_runs(flow) == runs + 1  # rank 1 opened no tracker
    report = json.loads((flow / "reports" / "sft-dp.json").read_text())
    assert proc.stdout.count("manifests/sft-dp.json: held-out") == len(report["heldout"]["after"])  # printed once
    checked(flow, str(BIN / "flowpin"), "verify", "manifests/sft-dp.json")
    run_key = json.loads((flow / "runs" / "sft-dp" / "run-key.json").read_text())
    code = run_key["parts"]["code"]  # the stage's dvc.yaml code deps
    assert "src/flowpin/post/sft.py" in code and "src/flowpin/cli.py" not in code
    checkpoint = flow / "runs" / "sft-dp" / "checkpoints" / "step-000002"
    weights = (checkpoint / "model.safetensors").read_bytes()

    cli = flow / "src" / "flowpin" / "cli.py"
    original = cli.read_bytes()
    try:
        cli.write_bytes(original + b"# an edit to the command line, which sft does not run\n")
        proc = run(launch)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    finally:
        cli.write_bytes(original)
    report = json.loads((flow / "reports" / "sft-dp.json").read_text())
    assert report["resumed_from"] == "step-000002" and report["removed_stale_checkpoints"] == []
    assert (checkpoint / "model.safetensors").read_bytes() == weights

    proc = run([sys.executable, "stages/sft.py", *SFT_DP, "sft.loop.steps=3"])
    assert proc.returncode == 2
    assert "flowpin: StaleCheckpointsError:" in proc.stderr and "loop.steps: 2 -> 3" in proc.stderr
    assert "FLOWPIN_STALE_CHECKPOINTS=discard" in proc.stderr
    assert (checkpoint / "model.safetensors").read_bytes() == weights  # kept, not removed
