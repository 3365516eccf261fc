"""SFT: response-only loss, packed examples, seeded batches, pass@1 grading, recipe refusals.

Fast: the loss is checked on a table model (logits per position are parameters, so which positions
count is visible), and once on a tiny megatron GPT against a hand computation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import flowpin.post.heldout as heldout
import flowpin.post.verifiers as verifiers
from flowpin.data.synth import Task
from flowpin.errors import CheckpointCorruptError, CheckpointMissingError, DataError, RecipeError
from flowpin.post.examples import example_batches, response_loss, solution_examples, tensor_digest, used_width
from flowpin.post.heldout import HeldoutEvalConfig, heldout_eval
from flowpin.post.inputs import check_fits, weights_digest
from flowpin.post.prompts import Vocab
from flowpin.post.sft import SFTConfig
from flowpin.recipe import to_config
from post_helpers import TableLM, make_tasks, make_vocab, tiny_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return make_tasks()


@pytest.fixture(scope="module")
def vocab(tasks: list[Task]) -> Vocab:
    return make_vocab(tasks)


# --- the loss -------------------------------------------------------------------------------------


def test_response_loss_is_the_mean_cross_entropy_of_the_response_tokens_only(vocab: Vocab, tasks: list[Task]) -> None:
    examples = solution_examples(tasks[:2], vocab, seq_len=32)
    model = TableLM(vocab.tokenizer.get_vocab_size(), 32)
    loss, metrics = response_loss(model, examples)
    ids, mask = examples[:, 0], examples[:, 1]
    terms = []
    for row in range(2):
        for t in range(31):
            if mask[row, t + 1]:
                terms.append(-F.log_softmax(model.table[t], dim=-1)[ids[row, t + 1]])
    assert metrics["response_tokens"] == len(terms) == int(mask.sum())
    assert math.isclose(loss.item(), torch.stack(terms).mean().item(), rel_tol=1e-6)


def test_prompt_and_padding_logits_do_not_change_the_loss(vocab: Vocab, tasks: list[Task]) -> None:
    example = solution_examples(tasks[:1], vocab, seq_len=32)
    mask = example[0, 1]
    first = int(mask.nonzero().min())  # the first response token, predicted at position first - 1
    last = int(mask.nonzero().max())
    model = TableLM(vocab.tokenizer.get_vocab_size(), 32)
    loss, _ = response_loss(model, example)
    torch.autograd.backward(loss)
    grad = model.table.grad
    assert grad is not None
    assert grad[: first - 1].abs().sum() == 0  # positions that predict prompt tokens
    assert grad[last:].abs().sum() == 0  # positions that predict padding (or nothing)
    assert grad[first - 1 : last].abs().sum(dim=-1).gt(0).all()  # every response token counts
    with torch.no_grad():
        model.table[: first - 1] += 5.0 * torch.randn(first - 1, model.table.shape[1])
        model.table[last:] -= 3.0
    assert torch.equal(response_loss(model, example)[0].detach(), loss.detach())
    with torch.no_grad():
        model.table[first - 1, 7] += 1.0
    assert not torch.equal(response_loss(model, example)[0].detach(), loss.detach())


@pytest.fixture(scope="module")
def megatron() -> Iterator[None]:
    """The process a stage's entry point prepares (process group, megatron's CPU patches), undone afterwards."""
    from flowpin.runtime import prepare_environment

    with prepare_environment(seed=0, threads=None):
        yield


def test_response_loss_on_the_megatron_gpt_matches_its_logits(megatron: None, vocab: Vocab, tasks: list[Task]) -> None:
    from flowpin.post.lm import logits
    from flowpin.train.transformer import build_model

    model = build_model(tiny_config(vocab.tokenizer.get_vocab_size()), device="cpu", seed=3)
    examples = solution_examples(tasks, vocab, seq_len=48)
    loss, _ = response_loss(model, examples)
    ids, mask = examples[:, 0], examples[:, 1]
    logp = F.log_softmax(logits(model, ids[:, :-1]).float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    expected = -(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


# --- examples and batches -------------------------------------------------------------------------


def test_examples_mask_the_solution_and_eos(vocab: Vocab, tasks: list[Task]) -> None:
    examples = solution_examples(tasks, vocab, seq_len=48)
    assert examples.shape == (len(tasks), 2, 48) and examples.dtype == torch.int64
    for task, (ids, mask) in zip(tasks, examples, strict=True):
        response = ids[mask.bool()].tolist()
        assert response == vocab.response_ids(task.solution)
        assert vocab.decode(response) == task.solution
        assert ids[: len(vocab.prompt_ids(task.prompt))].tolist() == vocab.prompt_ids(task.prompt)


def test_an_example_longer_than_seq_len_is_refused_not_truncated(vocab: Vocab, tasks: list[Task]) -> None:
    with pytest.raises(DataError, match=r"sft\.seq_len \(synth/train/arithmetic/2\).*raise seq_len"):
        solution_examples(tasks[2:3], vocab, seq_len=8)


def test_a_solution_that_does_not_verify_is_refused(vocab: Vocab, tasks: list[Task]) -> None:
    bad = Task(
        id="synth/train/arithmetic/9", kind="arithmetic", prompt="What is 1 + 1?", solution="Answer: 3", answer="2"
    )
    with pytest.raises(DataError, match="synth/train/arithmetic/9: its solution does not verify"):
        solution_examples([bad], vocab, seq_len=48)


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch(vocab: Vocab, tasks: list[Task]) -> None:
    examples = solution_examples(tasks, vocab, seq_len=48)
    batches = example_batches(examples, order_seed=7, batch_size=2)
    again = example_batches(examples.clone(), order_seed=7, batch_size=2)
    assert torch.equal(batches(5), again(5)) and batches(5).shape == (2, 2, 48)
    epoch = torch.cat([batches(s) for s in range(3)])  # 6 examples, batch 2: one epoch
    assert sorted(tensor_digest(e) for e in epoch) == sorted(tensor_digest(e) for e in examples)
    other_seed = example_batches(examples, order_seed=8, batch_size=2)
    assert any(not torch.equal(batches(s), other_seed(s)) for s in range(3))
    changed = examples.clone()
    changed[0, 0, 0] += 1
    assert tensor_digest(changed) != tensor_digest(examples)  # the order is keyed by the exact tokens
    assert example_batches(changed, order_seed=7, batch_size=2).order.dataset_digest != batches.order.dataset_digest


def test_used_width_cuts_only_trailing_padding() -> None:
    batch = torch.zeros(2, 4, 10, dtype=torch.long)
    batch[0, 1, 2:5] = 1  # row 0: chosen response ends at column 4
    batch[1, 3, 3:7] = 1  # row 1: rejected response ends at column 6
    assert used_width(batch) == 7
    assert used_width(torch.zeros(1, 2, 5, dtype=torch.long)) == 1


# --- held-out eval --------------------------------------------------------------------------------


def test_heldout_eval_grades_greedy_answers_per_kind(
    vocab: Vocab, tasks: list[Task], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []

    def fake_generate(model: Any, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[list[int]]:
        seen.append(kwargs)
        out = []
        for prompt in prompts:
            task = next(t for t in tasks if vocab.prompt_ids(t.prompt) == list(prompt))
            n = int(task.id.rsplit("/", 1)[1])
            # two arithmetic tasks and one word problem right; one answer not in the Answer: N form
            text = task.solution if n in (0, 2, 4) else "no idea" if n == 1 else "1 + 1 = 2. Answer: -1"
            out.append([*vocab.tokenizer.encode(text + "\nmore").ids, vocab.eos_id])
        return out

    monkeypatch.setattr(heldout, "generate", fake_generate)
    cfg = HeldoutEvalConfig(kinds=("arithmetic", "word_problem"), tasks=3, batch_size=2, max_new_tokens=9)
    model = TableLM(vocab.tokenizer.get_vocab_size(), 64)
    result = heldout_eval(model, tasks, vocab, cfg, max_len=64)
    arithmetic = result["arithmetic"]
    assert (arithmetic["tasks"], arithmetic["correct"], arithmetic["formatted"]) == (3, 2, 2)
    assert result["word_problem"]["tasks"] == 2 and result["word_problem"]["pass_at_1"] == 0.5
    assert arithmetic["examples"][0]["output"] == tasks[0].solution  # the first line only
    assert all(k["cfg"].temperature == 0 and k["cfg"].max_new_tokens == 9 for k in seen)  # greedy
    assert all(vocab.eos_id in k["stop_ids"] and set(vocab.newline_ids()) <= set(k["stop_ids"]) for k in seen)
    expected = response_loss(model, solution_examples(tasks[:3], vocab, seq_len=64))[0]  # solutions, teacher-forced
    assert math.isclose(arithmetic["response_loss"], expected.item(), rel_tol=1e-5)
    assert model.training  # the eval put the model back as it found it
    with pytest.raises(DataError, match="no 'word_problem' task"):
        heldout_eval(model, tasks[:4], vocab, cfg, max_len=64)
    # graded by the verifier registry eval uses: another verifier for a kind changes its pass@1
    monkeypatch.setitem(verifiers._KIND_VERIFIERS, "word_problem", "answer_format")
    regraded = heldout_eval(model, tasks, vocab, cfg, max_len=64)["word_problem"]
    assert (regraded["correct"], regraded["formatted"]) == (2, 2)  # "Answer: -1" is well formed, though wrong


# --- recipe and inputs ----------------------------------------------------------------------------


def reference_block() -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.load(REPO / "params" / "sft.yaml"), resolve=True)
    assert isinstance(plain, dict)
    block: dict[str, Any] = plain["sft"]
    return block


def test_the_reference_recipe_loads() -> None:
    cfg = to_config(SFTConfig, reference_block(), where="sft")
    assert cfg.loop.optim.schedule.total_steps == cfg.loop.steps
    assert cfg.eval.kinds == ("arithmetic",) and cfg.kinds == ("arithmetic", "word_problem")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kinds": ["algebra"]}, r"sft\.kinds: 'algebra' is not one of arithmetic, word_problem"),
        ({"kinds": []}, r"sft\.kinds: empty"),
        ({"kinds": ["arithmetic", "arithmetic"]}, r"sft\.kinds: .* names a kind twice"),
        ({"seq_len": 1}, r"sft\.seq_len: 1 must be in"),
        ({"eval": {"tasks": 0}}, r"eval\.tasks: 0 must be"),
        ({"eval": {"kinds": ["poetry"]}}, r"eval\.kinds: 'poetry'"),
        ({"learning_rate": 1.0}, r"sft\.learning_rate: unknown key"),
        ({"order_seed": -1}, r"sft\.order_seed: -1 must be in"),
    ],
)
def test_recipe_refusals(change: dict[str, Any], message: str) -> None:
    block = {**reference_block(), **change}
    with pytest.raises(RecipeError, match=message):
        to_config(SFTConfig, block, where="sft")


def test_a_model_sized_for_another_tokenizer_or_a_shorter_context_is_refused(vocab: Vocab, tmp_path: Path) -> None:
    size = vocab.tokenizer.get_vocab_size()
    check_fits(tiny_config(size), vocab, 64, tmp_path)
    with pytest.raises(DataError, match=f"vocab_size {size + 1}, but the tokenizer has {size} tokens"):
        check_fits(tiny_config(size + 1), vocab, 64, tmp_path)
    with pytest.raises(RecipeError, match="seq_len: 65 exceeds the model's context 64"):
        check_fits(tiny_config(size), vocab, 65, tmp_path)


def test_weights_digest_reads_the_checkpoint_state(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-000001"
    with pytest.raises(CheckpointMissingError, match=r"state\.json: missing"):
        weights_digest(ckpt)
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"files": {"model.safetensors": {"sha256": "ab" * 32}}}))
    assert weights_digest(ckpt) == "ab" * 32
    (ckpt / "state.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(CheckpointCorruptError, match=r"no model\.safetensors digest"):
        weights_digest(ckpt)
