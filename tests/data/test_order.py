"""Exact data order: the batch at any step, computed directly, and what `flowpin batch` shows of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from flowpin.cli import main as flowpin_main
from flowpin.data.order import (
    DataOrder,
    batch_indices,
    batch_target,
    describe_batch,
    epoch_permutation,
    keyed_permutation,
    load_batch,
    order_for,
)
from flowpin.data.shards import write_dataset
from flowpin.data.tokenize import TokenizeConfig, run_tokenize
from flowpin.data.tokenized import TokenizedDataset, dataset_digest
from flowpin.errors import DataOrderError, RecipeError
from flowpin.manifest.record import record
from flowpin.recipe import to_config
from helpers import Project

D1 = "a" * 64
D2 = "b" * 64

# batch_indices(n_sequences=1000, dataset_digest=D1, order_seed=7, batch_size=6, step=123): pinned so
# that a change of the seed derivation, the bit generator or the permutation rule cannot go unnoticed
# (it would silently change which tokens every past run saw at every step).
GOLDEN_BATCH = [806, 842, 570, 310, 43, 315]

RECIPE: dict[str, Any] = {
    "tokenizer": {"vocab_size": 300, "min_frequency": 2, "special_tokens": ["<|endoftext|>", "<|pad|>"], "seed": 3},
    "packing": {"seq_len": 16, "tail": "pad"},
    "shards": {"sequences_per_shard": 7, "zstd_level": 3},
}


ORDER = ("--order-seed", "11", "--batch-size", "3")
"""A dataset has no order of its own: `flowpin batch` on one needs both."""


def kwargs(**changes: Any) -> dict[str, Any]:
    return {"n_sequences": 37, "dataset_digest": D1, "order_seed": 5, "batch_size": 4, "step": 3, **changes}


# --- the order ------------------------------------------------------------------------------------


def test_batch_indices_is_pure() -> None:
    assert batch_indices(**kwargs()) == batch_indices(**kwargs())
    assert batch_indices(**kwargs()) != batch_indices(**kwargs(step=4))
    assert batch_indices(**kwargs()) != batch_indices(**kwargs(order_seed=6))
    assert batch_indices(**kwargs()) != batch_indices(**kwargs(dataset_digest=D2))
    assert all(isinstance(i, int) for i in batch_indices(**kwargs()))


def test_golden_batch() -> None:
    got = batch_indices(n_sequences=1000, dataset_digest=D1, order_seed=7, batch_size=6, step=123)
    assert got == GOLDEN_BATCH


def test_order_follows_the_documented_rule() -> None:
    """Re-derive step 123 from the rule in flowpin.data.order's docstring, independently of its code."""
    import hashlib

    n, batch_size, step = 1000, 6, 123
    expected = []
    for p in range(step * batch_size, (step + 1) * batch_size):
        key = json.dumps(
            {"dataset": D1, "epoch": p // n, "scheme": "flowpin.order/v1", "seed": 7}, separators=(",", ":")
        )
        entropy = int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")
        raw = np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(n)
        expected.append(int(np.argsort(raw, kind="stable")[p % n]))
    assert expected == GOLDEN_BATCH


def test_every_epoch_is_a_permutation_and_epochs_differ() -> None:
    perms = [epoch_permutation(n_sequences=37, dataset_digest=D1, order_seed=5, epoch=e) for e in range(4)]
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(37))
        assert not perm.flags.writeable
    assert len({tuple(p.tolist()) for p in perms}) == 4


@pytest.mark.parametrize("batch_size", [1, 5, 37, 50])
def test_direct_step_equals_sequential_replay(batch_size: int) -> None:
    n, steps = 37, 40
    epochs = steps * batch_size // n + 1
    stream = np.concatenate(
        [epoch_permutation(n_sequences=n, dataset_digest=D1, order_seed=5, epoch=e) for e in range(epochs)]
    )
    for step in range(steps):
        replay = stream[step * batch_size : (step + 1) * batch_size].tolist()
        assert batch_indices(**kwargs(batch_size=batch_size, step=step)) == replay
    # a far step needs no replay (and wraps epochs)
    far = batch_indices(**kwargs(batch_size=batch_size, step=10**9))
    assert len(far) == batch_size and all(0 <= i < n for i in far)


def test_each_sequence_once_per_epoch_over_steps() -> None:
    order = DataOrder(n_sequences=20, dataset_digest=D1, order_seed=1, batch_size=4)
    seen = [i for step in range(5) for i in order.batch(step)]
    assert sorted(seen) == list(range(20))
    assert order.epoch(4) == 0 and order.epoch(5) == 1 and order.steps_per_epoch == 5.0


def test_keyed_permutation_depends_only_on_its_key() -> None:
    a = keyed_permutation(100, b"k")
    assert np.array_equal(a, keyed_permutation(100, b"k"))
    assert not np.array_equal(a, keyed_permutation(100, b"l"))
    assert keyed_permutation(0, b"k").tolist() == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"step": -1}, "step must be >= 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"n_sequences": 0}, "n_sequences must be >= 1"),
        ({"order_seed": -3}, "order_seed must be >= 0"),
        ({"dataset_digest": "xyz"}, "not a lower-case hex sha256"),
        ({"step": 2**60}, "beyond position"),
        ({"step": 1.5}, "must be an integer"),
    ],
)
def test_bad_requests(change: dict[str, Any], message: str) -> None:
    with pytest.raises(DataOrderError, match=message):
        batch_indices(**kwargs(**change))


def test_data_order_validates() -> None:
    with pytest.raises(DataOrderError, match="batch_size"):
        DataOrder(n_sequences=3, dataset_digest=D1, order_seed=0, batch_size=0)


def test_the_tokenize_recipe_holds_no_order() -> None:
    """The training recipe owns the order (train.order_seed, train.loop.batch_size): a stale block is refused."""
    with pytest.raises(RecipeError, match=r"tokenize\.order: unknown key"):
        to_config(TokenizeConfig, {**RECIPE, "order": {"seed": 11, "batch_size": 3}}, where="tokenize")


# --- against a tokenized dataset ------------------------------------------------------------------


def make_dataset(directory: Path) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    records = [
        {"id": f"doc/{i}", "text": " ".join(words[(i + k) % 10] for k in range(i % 7 + 3)), "source": {"n": i}}
        for i in range(25)
    ]
    write_dataset(records, directory / "corpus", docs_per_shard=10, level=3)
    out = directory / "data" / "tokenize"
    out.mkdir(parents=True)
    run_tokenize(to_config(TokenizeConfig, RECIPE, where="tokenize"), directory / "corpus", out)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("order"))


def test_describe_batch_explains_every_token(dataset: Path) -> None:
    data = TokenizedDataset.open(dataset)
    tok = data.tokenizer()
    table = data.documents()
    samples = describe_batch(dataset, order_seed=11, batch_size=3, step=5)
    assert [s.sequence for s in samples] == batch_indices(
        n_sequences=data.n_sequences, dataset_digest=dataset_digest(dataset), order_seed=11, batch_size=3, step=5
    )
    for s in samples:
        ids, docs = data.sequences([s.sequence])
        covered = sum(d.end - d.start for d in s.documents) + s.pad_tokens
        assert covered == data.seq_len
        for d in s.documents:
            entry = table[d.document]
            assert d.id == entry.id and d.source == entry.record["source"]
            assert (docs[0, d.start : d.end] == d.document).all()
            assert 0 <= d.doc_start < d.doc_end <= entry.tokens
        assert s.text == tok.decode(ids[0][docs[0] >= 0].tolist(), skip_special_tokens=False)
        assert s.to_json()["documents"][0]["id"] == s.documents[0].id


def test_describe_batch_refuses_another_digest(dataset: Path) -> None:
    with pytest.raises(DataOrderError, match="the data changed since it was pinned"):
        describe_batch(dataset, order_seed=11, batch_size=3, step=0, dataset_digest=D1)


def test_load_batch(dataset: Path) -> None:
    data = TokenizedDataset.open(dataset)
    order = order_for(data, order_seed=11, batch_size=4)
    x = load_batch(data, order, 9)
    assert x.dtype == np.int32 and x.shape == (4, data.seq_len)
    assert np.array_equal(x, data.sequences(order.batch(9))[0])
    foreign = DataOrder(n_sequences=data.n_sequences, dataset_digest=D1, order_seed=11, batch_size=4)
    with pytest.raises(DataOrderError, match="build the DataOrder from this dataset"):
        load_batch(data, foreign, 0)


# --- flowpin batch --------------------------------------------------------------------------------


def record_tokenize(project: Project) -> Path:
    out = make_dataset(project.root)
    assert out == project.root / "data" / "tokenize"
    recipe = {"paths": {"out": "data/tokenize"}, "tokenize": RECIPE}
    with record("tokenize", recipe=recipe, code=[], root=project.root, signer=project.signer) as rec:
        rec.output("data/tokenize")
    return project.manifest_path("tokenize")


def test_cli_batch_from_manifest(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = record_tokenize(project)
    monkeypatch.chdir(project.root)
    assert flowpin_main(["batch", str(manifest), "--step", "12345", "--json"]) == 2  # a dataset has no order
    assert "pass --order-seed and --batch-size" in capsys.readouterr().err
    assert flowpin_main(["batch", str(manifest), "--step", "12345", "--json", *ORDER]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["batch_size"], shown["order_seed"], shown["step"], shown["position"]) == (3, 11, 12345, 12345)
    assert shown["world_size"] == 1 and {s["rank"] for s in shown["samples"]} == {0}
    assert shown["dataset_digest"] == dataset_digest(project.root / "data" / "tokenize")
    assert [s["sequence"] for s in shown["samples"]] == batch_indices(
        n_sequences=shown["n_sequences"],
        dataset_digest=shown["dataset_digest"],
        order_seed=11,
        batch_size=3,
        step=12345,
    )
    assert flowpin_main(["batch", str(manifest), "--step", "7", "--batch-size", "2", "--order-seed", "4"]) == 0
    text = capsys.readouterr().out
    assert "seed 4, batch size 2, step 7 (the order's, 0-based)" in text and "[1] sequence" in text and "doc/" in text


def test_cli_batch_refuses_data_that_does_not_match_the_manifest(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = record_tokenize(project)
    monkeypatch.chdir(project.root)
    (project.root / "data" / "tokenize" / "extra.txt").write_text("not part of the pinned dataset\n")
    assert flowpin_main(["batch", str(manifest), "--step", "0", *ORDER]) == 2
    assert "DataOrderError" in capsys.readouterr().err


def test_cli_batch_with_a_blake3_manifest(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The order is keyed by the sha256 digest whatever algorithm the manifest pins (that one is checked)."""
    make_dataset(project.root)
    recipe = {"paths": {"out": "data/tokenize"}, "tokenize": RECIPE}
    with record(
        "tokenize", recipe=recipe, code=[], root=project.root, signer=project.signer, algorithm="blake3"
    ) as rec:
        rec.output("data/tokenize")
    manifest = project.manifest_path("tokenize")
    monkeypatch.chdir(project.root)
    assert flowpin_main(["batch", str(manifest), "--step", "4", "--json", *ORDER]) == 0
    assert json.loads(capsys.readouterr().out)["dataset_digest"] == dataset_digest(project.root / "data" / "tokenize")
    (project.root / "data" / "tokenize" / "extra.txt").write_text("x\n")
    assert flowpin_main(["batch", str(manifest), "--step", "4", *ORDER]) == 2
    assert "blake3 digest" in capsys.readouterr().err


def test_cli_batch_bad_step(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = record_tokenize(project)
    monkeypatch.chdir(project.root)
    assert flowpin_main(["batch", str(manifest), "--step", "-2", *ORDER]) == 2
    assert "step must be >= 0" in capsys.readouterr().err
    assert flowpin_main(["batch", str(manifest), "--step", "2", "--order-seed", "1", "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err


def test_cli_batch_from_recipe(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_dataset(project.root)
    params = project.root / "params" / "tokenize.yaml"
    params.parent.mkdir()
    params.write_text(
        yaml.safe_dump({"defaults": ["common/hydra", "_self_"], "paths": {"out": "data/tokenize"}, "tokenize": RECIPE})
    )
    monkeypatch.chdir(project.root)
    target = batch_target(params, project.root)
    assert target.pinned is None and target.data_dir == project.root / "data" / "tokenize"
    assert flowpin_main(["batch", str(params), "--step", "1", "--json", *ORDER]) == 0
    assert len(json.loads(capsys.readouterr().out)["samples"]) == 3
    # the directory itself, as named
    assert flowpin_main(["batch", "data/tokenize", "--step", "1", "--json", *ORDER]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "data/tokenize"


def test_cli_batch_on_a_manifest_that_is_not_tokenize(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = project.record_stage("train")
    monkeypatch.chdir(project.root)
    assert flowpin_main(["batch", str(manifest), "--step", "0", *ORDER]) == 2
    assert "neither a training nor a tokenize one" in capsys.readouterr().err
