"""`flowpin batch` on a training run: the batch training step N saw, as the loop really drew it.

One tiny flow, built once: a tokenized dataset and its signed manifest, a 6-step run of flowpin's loop
(a toy model, checkpoints every 2 steps) recorded as a signed training manifest, and a fork of it from
step 4 under another order seed. Every batch the loop drew is recorded as it was drawn, so the command is
checked against what training consumed, not against a re-derivation of the rule.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from flowpin.cli import main as flowpin_main
from flowpin.constants import CHECKPOINTS_DIR
from flowpin.data.order import DataOrder, order_for
from flowpin.data.shards import write_dataset
from flowpin.data.tokenize import TokenizeConfig, run_tokenize
from flowpin.data.tokenized import TokenizedDataset
from flowpin.manifest.record import record
from flowpin.recipe import to_config
from flowpin.signing import Signer, init_key
from flowpin.train.checkpoint import DataPosition, TrainState, capture_rng, load_checkpoint, save_checkpoint
from flowpin.train.loop import OptimConfig, OrderedBatches, TrainConfig, build_optimizer, rank_rows, seed_all, train
from flowpin.train.schedule import ScheduleConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED, FORK_SEED, B, STEPS, FORK_AT, FORK_STEPS = 11, 99, 4, 6, 4, 8
TOKENIZE = {
    "tokenizer": {"vocab_size": 300, "min_frequency": 2, "special_tokens": ["<|endoftext|>", "<|pad|>"], "seed": 3},
    "packing": {"seq_len": 16, "tail": "pad"},
    "shards": {"sequences_per_shard": 7, "zstd_level": 3},
}
PRETRAIN = "manifests/pretrain.json"
FORK = "runs/forks/f1/manifest.json"


def train_recipe(order_seed: int, steps: int) -> dict[str, Any]:
    data = {"data": "data/tokenize", "manifest": "manifests/tokenize.json"}
    return {
        "paths": {"inputs": {"data": data}, "out": "runs/pretrain/checkpoints"},
        "train": {"order_seed": order_seed, "loop": {"batch_size": B, "steps": steps}},
    }


@dataclasses.dataclass
class Recording:
    """The loop's batch source, keeping every (data position, batch) in the order the loop drew them."""

    inner: OrderedBatches
    drawn: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)

    @property
    def order(self) -> DataOrder:
        return self.inner.order

    def __call__(self, step: int) -> torch.Tensor:
        batch = self.inner(step)
        self.drawn.append((step, batch.clone()))
        return batch


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 8)
        self.head = nn.Linear(8, 300)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.embed(x))
        return out


def toy_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 300), batch[:, 1:].reshape(-1))


def loop_config(steps: int) -> TrainConfig:
    schedule = ScheduleConfig(total_steps=steps, warmup_steps=1, peak_lr=1e-2, min_lr=1e-3)
    return TrainConfig(
        steps=steps, batch_size=B, seed=5, checkpoint_every=2, log_every=2, optim=OptimConfig(schedule=schedule)
    )


@dataclasses.dataclass
class Flow:
    root: Path
    signer: Signer
    drawn: list[tuple[int, torch.Tensor]]
    """What the pretrain loop drew: entry i is training step i + 1."""
    fork_drawn: list[tuple[int, torch.Tensor]]
    """What the fork drew: entry i is training step FORK_AT + 1 + i."""


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    with pytest.MonkeyPatch.context() as mp:
        for var in ("FLOWPIN_ROOT", "FLOWPIN_SIGNING_KEY", "FLOWPIN_DIGEST_ALGORITHM"):
            mp.delenv(var, raising=False)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield build_flow(tmp_path_factory.mktemp("flow") / "proj")
        finally:
            torch.set_num_threads(before)


def build_flow(root: Path) -> Flow:
    (root / ".dvc").mkdir(parents=True)
    signer = init_key(root, key_path=root / ".flowpin" / "keys" / "signing.key")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    docs = [{"id": f"doc/{i}", "text": " ".join(words[(i + k) % 10] for k in range(i % 7 + 3))} for i in range(25)]
    write_dataset(docs, root / "corpus", docs_per_shard=10, level=3)
    out = root / "data" / "tokenize"
    out.mkdir(parents=True)
    run_tokenize(to_config(TokenizeConfig, TOKENIZE, where="tokenize"), root / "corpus", out)
    with record(
        "tokenize", recipe={"paths": {"out": "data/tokenize"}, "tokenize": TOKENIZE}, code=[], root=root, signer=signer
    ) as rec:
        rec.output("data/tokenize")

    data = TokenizedDataset.open(out)
    seed_all(0)
    batches = Recording(OrderedBatches(dataset=data, order=order_for(data, order_seed=SEED, batch_size=B)))
    run = train(model=Toy(), cfg=loop_config(STEPS), data=batches, loss_fn=toy_loss, run_dir=root / "runs" / "pretrain")
    with record("pretrain", recipe=train_recipe(SEED, STEPS), code=[], root=root, signer=signer) as rec:
        rec.upstream(data="data/tokenize", manifest="manifests/tokenize.json")
        for ref in run.checkpoints:
            rec.output(ref.path)

    # A fork from step 4 under another order: the loop starts that order at its position 0.
    parent = root / "runs" / "pretrain" / CHECKPOINTS_DIR / f"step-{FORK_AT:06d}"
    model = Toy()
    optimizer = build_optimizer(model, loop_config(FORK_STEPS).optim)
    state = load_checkpoint(parent, model=model, optimizer=optimizer)
    forked = Recording(OrderedBatches(dataset=data, order=order_for(data, order_seed=FORK_SEED, batch_size=B)))
    fork_dir = root / "runs" / "forks" / "f1"
    result = train(
        model=model,
        cfg=loop_config(FORK_STEPS),
        data=forked,
        loss_fn=toy_loss,
        run_dir=fork_dir,
        optimizer=optimizer,
        start_state=state,
    )
    with record(
        "pretrain", recipe=train_recipe(FORK_SEED, FORK_STEPS), code=[], root=root, signer=signer, manifest=FORK
    ) as rec:
        rec.upstream(data="data/tokenize", manifest="manifests/tokenize.json")
        rec.input(parent, kind="checkpoint")
        for ref in result.checkpoints:
            if ref.step > FORK_AT:
                rec.output(ref.path)
    return Flow(root=root, signer=signer, drawn=batches.drawn, fork_drawn=forked.drawn)


def batch_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert flowpin_main(["batch", *argv, "--json"]) == 0, capsys.readouterr().err
    shown: dict[str, Any] = json.loads(capsys.readouterr().out)
    return shown


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert flowpin_main(["batch", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def tokens_of(root: Path, shown: dict[str, Any]) -> torch.Tensor:
    data = TokenizedDataset.open(root / shown["dataset"])
    ids, _ = data.sequences([s["sequence"] for s in shown["samples"]])
    return torch.from_numpy(ids).long()


@pytest.fixture
def in_flow(flow: Flow, monkeypatch: pytest.MonkeyPatch) -> Flow:
    monkeypatch.chdir(flow.root)
    return flow


@pytest.fixture
def copy(flow: Flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the flow to damage."""
    root = tmp_path / "proj"
    shutil.copytree(flow.root, root)
    monkeypatch.chdir(root)
    return root


# --- the answer is what the loop drew ---------------------------------------------------------------


def test_every_step_of_a_training_manifest_is_the_batch_the_loop_drew(
    in_flow: Flow, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(in_flow.drawn) == STEPS
    for n in range(1, STEPS + 1):
        shown = batch_json(capsys, PRETRAIN, "--step", str(n))
        position, batch = in_flow.drawn[n - 1]
        assert (shown["step"], shown["position"], shown["offset"]) == (n, position, 0)
        assert (shown["order_seed"], shown["batch_size"], shown["world_size"]) == (SEED, B, 1)
        assert torch.equal(tokens_of(in_flow.root, shown), batch)  # the very tokens trained on
        assert [s["rank"] for s in shown["samples"]] == [0] * B
        assert shown["kind"] == "training manifest" and shown["trust"].startswith("VERIFIED")


def test_a_checkpoint_directory_gives_the_same_answer(in_flow: Flow, capsys: pytest.CaptureFixture[str]) -> None:
    for n, checkpoint in ((1, "step-000002"), (3, "step-000004"), (3, "step-000006"), (6, "step-000006")):
        by_checkpoint = batch_json(capsys, f"runs/pretrain/checkpoints/{checkpoint}", "--step", str(n))
        by_manifest = batch_json(capsys, PRETRAIN, "--step", str(n))
        assert by_checkpoint["samples"] == by_manifest["samples"]
        assert by_checkpoint["position"] == in_flow.drawn[n - 1][0]
    assert "it is the copy manifests/pretrain.json pins" in by_checkpoint["trust"]
    assert flowpin_main(["batch", "runs/pretrain/checkpoints/step-000004", "--step", "2"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint state.json is not a signed record" in text and "training step 2 (1-based)" in text


def test_a_fork_on_a_new_order_counts_from_its_fork_step(in_flow: Flow, capsys: pytest.CaptureFixture[str]) -> None:
    for n in range(FORK_AT + 1, FORK_STEPS + 1):
        for target in (FORK, f"runs/forks/f1/checkpoints/step-{FORK_STEPS:06d}"):
            shown = batch_json(capsys, target, "--step", str(n))
            position, batch = in_flow.fork_drawn[n - FORK_AT - 1]
            assert (shown["position"], shown["offset"], shown["order_seed"]) == (position, -FORK_AT, FORK_SEED)
            assert torch.equal(tokens_of(in_flow.root, shown), batch)
    assert "trained by the parent run" in refused(capsys, FORK, "--step", str(FORK_AT))


# --- data parallel ------------------------------------------------------------------------------------


def test_each_sample_names_the_rank_that_trained_it(
    in_flow: Flow, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkpoint as a 2-rank run writes it (the world size recorded with the determinism settings).
    data = TokenizedDataset.open(in_flow.root / "data" / "tokenize")
    model = Toy()
    state = TrainState(
        step=3,
        tokens_seen=3 * B * data.seq_len,
        data=DataPosition(dataset_digest=data.digest(), order_seed=SEED, batch_size=B, next_step=3),
        lr=1e-3,
        config={},
        rng=capture_rng(),
        determinism={"data_parallel_world_size": 2, "data_parallel_backend": "gloo"},
    )
    checkpoint = tmp_path / "dp" / "step-000003"
    save_checkpoint(checkpoint, state, model=model, optimizer=build_optimizer(model, loop_config(3).optim))

    argv = (str(checkpoint), "--step", "2", "--data", "data/tokenize")
    shown = batch_json(capsys, *argv)
    assert (shown["world_size"], shown["position"]) == (2, in_flow.drawn[1][0])
    assert shown["trust"].startswith("UNVERIFIED: checkpoint state.json is not signed")
    for rank in (0, 1):
        rows = list(range(B)[rank_rows(B, rank, 2)])
        assert [s["position"] for s in shown["samples"] if s["rank"] == rank] == rows
        mine = batch_json(capsys, *argv, "--rank", str(rank))
        assert mine["rank"] == rank and [s["position"] for s in mine["samples"]] == rows
        assert mine["samples"] == [s for s in shown["samples"] if s["rank"] == rank]
    assert flowpin_main(["batch", *argv, "--rank", "1"]) == 0
    text = capsys.readouterr().out
    assert "UNVERIFIED: checkpoint state.json is not signed" in text
    assert "[2] sequence" in text and "[0] sequence" not in text and "rank 1)" in text
    assert "0..1" in refused(capsys, *argv, "--rank", "2")

    # --world-size overrides what a run recorded (1 here): the same rows rank_rows gives.
    four = batch_json(capsys, PRETRAIN, "--step", "1", "--world-size", "4")
    assert [s["rank"] for s in four["samples"]] == [r for r in range(4) for _ in range(B)[rank_rows(B, r, 4)]]
    assert "does not divide" in refused(capsys, PRETRAIN, "--step", "1", "--world-size", "3")


# --- refusals -----------------------------------------------------------------------------------------


def test_steps_outside_the_run_are_refused(in_flow: Flow, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, PRETRAIN, "--step", "0")
    assert "DataOrderError" in err and "training steps count from 1" in err and "steps 1..6" in err
    assert "steps 1..6" in refused(capsys, PRETRAIN, "--step", str(STEPS + 1))
    err = refused(capsys, "runs/pretrain/checkpoints/step-000002", "--step", "3")
    assert "state after 2 steps" in err and "later checkpoint" in err
    assert "--step" in refused(capsys, PRETRAIN, "--step", "-1")


def test_the_run_fixes_the_order_and_a_dataset_has_none(in_flow: Flow, capsys: pytest.CaptureFixture[str]) -> None:
    assert "fixes the order" in refused(capsys, PRETRAIN, "--step", "1", "--order-seed", "3")
    assert "fixes the order" in refused(capsys, PRETRAIN, "--step", "1", "--batch-size", "2")
    err = refused(capsys, "manifests/tokenize.json", "--step", "1")
    assert "--order-seed and --batch-size" in err and "manifests/pretrain.json" in err
    # With both, the dataset's order step (0-based) is the training run's data position.
    shown = batch_json(capsys, "data/tokenize", "--step", "2", "--order-seed", str(SEED), "--batch-size", str(B))
    assert torch.equal(tokens_of(in_flow.root, shown), in_flow.drawn[2][1])


def test_a_post_training_manifest_is_refused_naming_what_is_supported(
    copy: Path, flow: Flow, capsys: pytest.CaptureFixture[str]
) -> None:
    (copy / "runs" / "sft").mkdir(parents=True)
    (copy / "runs" / "sft" / "x.txt").write_text("x\n")
    with record("sft", recipe={"sft": {"order_seed": 1}}, code=[], root=copy, signer=flow.signer) as rec:
        rec.output("runs/sft/x.txt")
    err = refused(capsys, "manifests/sft.json", "--step", "1")
    assert "post-training stage 'sft'" in err and "manifests/pretrain.json" in err


def envelope(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    env = json.loads(path.read_bytes())
    return env, json.loads(base64.b64decode(env["payload"]))


def test_an_unverified_training_manifest_is_refused_before_anything_is_read(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy / PRETRAIN
    original = path.read_bytes()
    env, statement = envelope(path)
    statement["predicate"]["buildDefinition"]["externalParameters"]["recipe"]["train"]["order_seed"] = 12
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()  # changed, not re-signed
    path.write_text(json.dumps(env))
    shutil.rmtree(copy / "data" / "tokenize")  # nothing else may be read: no data error can come first
    err = refused(capsys, PRETRAIN, "--step", "1")
    assert "UnverifiedManifestError" in err and "refusing to read batches from it" in err

    path.write_bytes(original)  # intact, but signed by a key keys/ no longer trusts
    for pub in (copy / "keys").glob("*.pub"):
        pub.unlink()
    err = refused(capsys, PRETRAIN, "--step", "1")
    assert "UnverifiedManifestError" in err and "refusing to read batches from it" in err


def test_a_changed_checkpoint_or_dataset_is_refused(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = copy / "runs" / "pretrain" / CHECKPOINTS_DIR / "step-000004" / "state.json"
    document = json.loads(state.read_bytes())
    document["data"]["next_step"] = 9  # shifts every answer: a forged position
    state.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")))
    err = refused(capsys, PRETRAIN, "--step", "3")
    assert "not the file the signed manifest pins" in err
    shown = batch_json(capsys, "runs/pretrain/checkpoints/step-000004", "--step", "3")
    assert shown["trust"].startswith("UNVERIFIED") and "not the copy manifests/pretrain.json pins" in shown["trust"]

    (copy / "data" / "tokenize" / "extra.txt").write_text("not part of the pinned dataset\n")
    err = refused(capsys, PRETRAIN, "--step", "1")
    assert "DataOrderError" in err and "the data changed since it was pinned" in err


def test_a_checkpoint_state_is_read_with_the_strict_reader(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = copy / "runs" / "pretrain" / CHECKPOINTS_DIR / "step-000002" / "state.json"
    state.write_text(state.read_text().rstrip()[:-1] + ',"step":2}')  # a second "step": which one would count?
    for target in ("runs/pretrain/checkpoints/step-000002", PRETRAIN):
        err = refused(capsys, target, "--step", "1")
        assert "ArtifactUnreadableError" in err and "not valid JSON" in err and "step-000002/state.json" in err
