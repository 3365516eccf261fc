"""Checkpoints: full training state in safetensors + canonical JSON, byte-deterministic, verified on load."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import flowpin.train.checkpoint as ckpt
from flowpin.canonical import canonical_json
from flowpin.errors import (
    ArtifactMissingError,
    ArtifactUnreadableError,
    CanonicalError,
    DigestMismatchError,
    IntegrityError,
)
from flowpin.train.checkpoint import (
    DataPosition,
    ParentRef,
    TrainState,
    capture_rng,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    restore_rng,
    save_checkpoint,
    state_digest,
)

V, D, T, B = 48, 16, 12, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Dropout -> head tied to the embedding, plus a non-contiguous buffer."""

    def __init__(self, vocab: int = V, dim: int = D) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("mixer_t", torch.arange(dim * 3, dtype=torch.float32).reshape(3, dim).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.proj(self.norm(self.embed(x))))
        logits: torch.Tensor = self.head(h) / D**0.5
        return logits


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def make(seed: int = 0) -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1000 + step))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    model.train()
    for step in steps:
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_fn(model, batch(step)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=False)
        opt.step()


def state_at(step: int, **changes: Any) -> TrainState:
    fields: dict[str, Any] = {
        "step": step,
        "tokens_seen": step * B * T,
        "data": DataPosition(dataset_digest="d" * 64, order_seed=7, batch_size=B, next_step=step),
        "lr": 3e-3,
        "config": {"seed": 0, "steps": 100},
        "rng": capture_rng(),
        "metrics": {"loss": 3.25},
        "determinism": {"torch_num_threads": 1},
    }
    return TrainState(**{**fields, **changes})


def weights(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def opt_state(opt: torch.optim.Optimizer) -> dict[str, bytes]:
    out = {}
    for index, per in opt.state_dict()["state"].items():
        for key, value in per.items():
            out[f"{index}/{key}"] = value.numpy().tobytes()
    return out


def st_header(data: bytes) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return header


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, TinyLM, torch.optim.AdamW]:
    model, opt = make()
    train_steps(model, opt, range(3))
    path = tmp_path / "ck"
    save_checkpoint(path, state_at(3), model=model, optimizer=opt)
    return path, model, opt


# --- round trip -----------------------------------------------------------------------------------


def test_round_trip_restores_weights_optimizer_and_rng_streams(tmp_path: Path) -> None:
    model, opt = make()
    train_steps(model, opt, range(3))
    np_gen = np.random.default_rng(99)
    np_gen.random(3)
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    torch.rand(2), random.random(), np.random.rand(2)
    state = state_at(3, rng=capture_rng(numpy_generators={"mix": np_gen}))
    save_checkpoint(tmp_path / "ck", state, model=model, optimizer=opt)
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3), np_gen.random(3))

    fresh, fresh_opt = make(seed=123)
    other_gen = np.random.default_rng(0)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    loaded = load_checkpoint(tmp_path / "ck", model=fresh, optimizer=fresh_opt, numpy_generators={"mix": other_gen})

    assert loaded == state  # every JSON field, exactly (floats included)
    assert loaded.source == ParentRef(state_sha256=state_digest(tmp_path / "ck"), step=3)
    assert weights(fresh) == weights(model)
    assert fresh.head.weight is fresh.embed.weight  # tying survives (loaded in place)
    assert opt_state(fresh_opt) == opt_state(opt)
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert isinstance(fresh_opt.param_groups[0]["betas"], tuple)
    draws = (torch.rand(4), random.random(), np.random.rand(3), other_gen.random(3))
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2]) and np.array_equal(draws[3], expected_draws[3])


def test_resumed_training_equals_uninterrupted_bitwise(tmp_path: Path) -> None:
    model, opt = make()
    torch.manual_seed(42)  # dropout stream
    train_steps(model, opt, range(8))

    first, first_opt = make()
    torch.manual_seed(42)
    train_steps(first, first_opt, range(5))
    save_checkpoint(tmp_path / "ck", state_at(5), model=first, optimizer=first_opt)
    torch.manual_seed(0)  # a resumed process starts with other RNG state...
    second, second_opt = make(seed=77)  # ...and other initial weights
    load_checkpoint(tmp_path / "ck", model=second, optimizer=second_opt)
    train_steps(second, second_opt, range(5, 8))

    assert weights(second) == weights(model)
    assert opt_state(second_opt) == opt_state(opt)


def test_saving_the_same_state_twice_gives_identical_bytes(tmp_path: Path) -> None:
    model, opt = make()
    train_steps(model, opt, range(2))
    state = state_at(2)
    save_checkpoint(tmp_path / "a", state, model=model, optimizer=opt)
    save_checkpoint(tmp_path / "b", state, model=model, optimizer=opt)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    # and again after a load into other objects: the bytes are a function of the state, not of the objects
    fresh, fresh_opt = make(seed=5)
    loaded = load_checkpoint(tmp_path / "a", model=fresh, optimizer=fresh_opt)
    save_checkpoint(tmp_path / "c", loaded, model=fresh, optimizer=fresh_opt)
    assert files(tmp_path / "c") == files(tmp_path / "a")
    # one field changed -> different bytes
    save_checkpoint(tmp_path / "d", state_at(2, tokens_seen=1), model=model, optimizer=opt)
    assert files(tmp_path / "d")["state.json"] != files(tmp_path / "a")["state.json"]


def golden_checkpoint(path: Path) -> None:
    """A checkpoint from fixed values only (no RNG, no process settings): its bytes pin the format."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 8)
        model.bias.copy_(torch.tensor([0.5, -0.25]))
    opt = torch.optim.AdamW(model.parameters(), lr=0.125, betas=(0.5, 0.75), foreach=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    rng = ckpt.RngState(
        torch_cpu=torch.arange(16, dtype=torch.uint8),
        python={"version": 3, "internal": [1, 2, 3], "gauss_next": None},
        numpy={"bit_generator": "MT19937", "key": [4, 5], "pos": 1, "has_gauss": 0, "cached_gaussian": 0.0},
    )
    save_checkpoint(path, state_at(1, rng=rng, determinism={"torch_num_threads": 1}), model=model, optimizer=opt)


# Pinned: the bytes a checkpoint of fixed values gets. A change means the format changed -- bump
# FORMAT_VERSION and keep a reader for the old one, or fix the regression.
GOLDEN_FILES = {
    "model.safetensors": "301314a351113e92976e23affd7c2626c59ba55f7151ba29fa80e3a870722be9",
    "optimizer.safetensors": "ad2a0f02193ae980615faec74ad241da2ecb6b4ddb0ade653a7ffd204f13fa73",
    "rng.safetensors": "df57793d10261add7b822f1206ce66e838b08b36dbbfb94277daa22dbc46dfe3",
    "state.json": "334b7e6577a6825853f1655860d1a2304511cd34317a409d06eae139b642c4c1",  # without flowpin_version
}


def test_golden_checkpoint_bytes(tmp_path: Path) -> None:
    golden_checkpoint(tmp_path / "ck")
    got = {}
    for p in sorted((tmp_path / "ck").iterdir()):
        data = p.read_bytes()
        if p.name == "state.json":
            doc = json.loads(data)
            del doc["flowpin_version"]
            data = canonical_json(doc)
        got[p.name] = hashlib.sha256(data).hexdigest()
    assert got == GOLDEN_FILES


def test_layout_and_state_json(trained: tuple[Path, TinyLM, torch.optim.AdamW]) -> None:
    path, _, _ = trained
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    raw = (path / "state.json").read_bytes()
    doc = json.loads(raw)
    assert doc["format"] == "flowpin.checkpoint" and doc["version"] == 1
    assert doc["step"] == 3 and doc["data"]["next_step"] == 3 and doc["data"]["dataset_digest"] == "d" * 64
    assert doc["config_digest"] == hashlib.sha256(b'{"seed":0,"steps":100}').hexdigest()
    assert doc["model"]["aliases"] == {"head.weight": "embed.weight"}
    assert doc["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert doc["optimizer"]["param_groups"][0]["params"][0] == "embed.weight"
    for name in ckpt.TENSOR_FILES:
        data = (path / name).read_bytes()
        assert doc["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert st_header(data)["__metadata__"] == {"format": "pt"}  # one key: more are written in random order
    header = st_header((path / "optimizer.safetensors").read_bytes())
    assert {"embed.weight/exp_avg", "embed.weight/exp_avg_sq", "embed.weight/step"} <= set(header)
    assert header["embed.weight/step"]["shape"] == []
    model_header = st_header((path / "model.safetensors").read_bytes())
    assert "embed.weight" in model_header and "head.weight" not in model_header  # tied: stored once
    assert model_header["mixer_t"]["shape"] == [D, 3]  # the non-contiguous buffer, stored contiguous
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert all(os.stat(p).st_mode & 0o777 == 0o644 for p in path.iterdir())


def test_no_pickle_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used")

    for target, name in ((pickle, "dumps"), (pickle, "loads"), (pickle, "dump"), (pickle, "load")):
        monkeypatch.setattr(target, name, boom)
    monkeypatch.setattr(pickle, "Pickler", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "save", boom)
    monkeypatch.setattr(torch, "load", boom)
    model, opt = make()
    train_steps(model, opt, range(1))
    save_checkpoint(tmp_path / "ck", state_at(1), model=model, optimizer=opt)
    load_checkpoint(tmp_path / "ck", model=model, optimizer=opt)


def test_big_integer_generator_state_is_exact(tmp_path: Path) -> None:
    gen = np.random.Generator(np.random.PCG64(2**100 + 3))
    legacy = np.random.Generator(np.random.MT19937(4))
    rng = capture_rng(numpy_generators={"pcg": gen, "mt": legacy})
    state = json.loads(json.dumps(rng.numpy_generators))
    assert state["pcg"]["state"]["state"].keys() == {"$int"}
    assert state["mt"]["state"]["key"].keys() == {"$ndarray"}
    expect = (gen.random(5), legacy.random(5))
    g2, l2 = np.random.Generator(np.random.PCG64(0)), np.random.Generator(np.random.MT19937(0))
    restore_rng(rng, numpy_generators={"pcg": g2, "mt": l2})
    assert np.array_equal(g2.random(5), expect[0]) and np.array_equal(l2.random(5), expect[1])
    with pytest.raises(IntegrityError, match="no state for numpy generator 'other'"):
        restore_rng(rng, numpy_generators={"other": g2})


def test_extra_rng_states_are_kept_for_their_owner(tmp_path: Path) -> None:
    model, opt = make()
    tracker_state = {"model-parallel-rng": torch.arange(8, dtype=torch.uint8)}
    save_checkpoint(tmp_path / "ck", state_at(0, rng=capture_rng(extra=tracker_state)), model=model, optimizer=opt)
    loaded = load_checkpoint(tmp_path / "ck", model=model, optimizer=opt)
    assert list(loaded.rng.extra) == ["model-parallel-rng"]
    assert torch.equal(loaded.rng.extra["model-parallel-rng"], tracker_state["model-parallel-rng"])


# --- state_dict entries that need a rule ----------------------------------------------------------


class WithExtra(nn.Module):
    def __init__(self, extra: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.extra = extra
        self.received: Any = None

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.received = state


class Holder(nn.Module):
    def __init__(self, extra: Any) -> None:
        super().__init__()
        self.block = WithExtra(extra)


def test_json_and_tensor_extra_state_round_trip(tmp_path: Path) -> None:
    for extra in (
        {"fp8": False, "amax_history_len": 16, "recipe": ["delayed", 1.5]},
        torch.arange(5, dtype=torch.uint8),
    ):
        model = Holder(extra)
        opt = torch.optim.AdamW(model.parameters())
        save_checkpoint(tmp_path / "ck", state_at(0), model=model, optimizer=opt)
        # a fresh module's extra state need not look like a trained one's (TE: empty until FP8 has run)
        other = Holder(torch.empty(0, dtype=torch.uint8) if isinstance(extra, torch.Tensor) else None)
        load_checkpoint(tmp_path / "ck", model=other, optimizer=None)
        if isinstance(extra, torch.Tensor):
            assert torch.equal(other.block.received, extra)
        else:
            assert other.block.received == extra
            assert json.loads((tmp_path / "ck" / "state.json").read_bytes())["model"]["extra_state"] == {
                "block._extra_state": extra
            }


def test_extra_state_that_needs_pickle_is_refused(tmp_path: Path) -> None:
    model = Holder(io.BytesIO(b"fp8 meta"))  # what older Transformer Engine returns
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CanonicalError, match=r"block\._extra_state holds a BytesIO.*without pickle"):
        save_checkpoint(tmp_path / "ck", state_at(0), model=model, optimizer=opt)
    assert not (tmp_path / "ck").exists()


def test_views_sharing_one_storage_are_stored_as_copies(tmp_path: Path) -> None:
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            base = torch.arange(12, dtype=torch.float32)
            self.register_buffer("low", base[:6].view(2, 3))
            self.register_buffer("high", base[6:].view(3, 2).t())  # same storage, non-contiguous
            self.register_buffer("all", base.view(3, 4))  # overlaps both

    model = Views()
    save_checkpoint(tmp_path / "ck", state_at(0), model=model, optimizer=torch.optim.SGD(model.parameters()))
    with pytest.raises(CanonicalError, match="not a parameter of the model"):
        save_checkpoint(
            tmp_path / "x", state_at(0), model=model, optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))])
        )
    other = Views()
    other.get_buffer("all").zero_()
    load_checkpoint(tmp_path / "ck", model=other, optimizer=None)
    for name in ("low", "high", "all"):
        assert torch.equal(other.get_buffer(name), model.get_buffer(name))
    assert other.get_buffer("low").untyped_storage().data_ptr() == other.get_buffer("all").untyped_storage().data_ptr()


# --- damaged checkpoints --------------------------------------------------------------------------


def load_into_fresh(path: Path) -> TrainState:
    model, opt = make(seed=1)
    return load_checkpoint(path, model=model, optimizer=opt)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_corrupt_file_is_named(trained: tuple[Path, TinyLM, torch.optim.AdamW], name: str) -> None:
    path = trained[0]
    data = bytearray((path / name).read_bytes())
    data[-1] ^= 1
    (path / name).write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match=rf"{name}: sha256 .* state.json records"):
        load_into_fresh(path)


def test_truncated_file_is_named(trained: tuple[Path, TinyLM, torch.optim.AdamW]) -> None:
    path = trained[0]
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DigestMismatchError, match=r"model\.safetensors: \d+ bytes, state.json records"):
        load_into_fresh(path)
    with pytest.raises(DigestMismatchError, match=r"model\.safetensors"):
        read_state(path)


def test_missing_files_are_named(trained: tuple[Path, TinyLM, torch.optim.AdamW]) -> None:
    path = trained[0]
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(ArtifactMissingError, match=r"optimizer\.safetensors: missing from the checkpoint"):
        load_into_fresh(path)
    (path / "state.json").unlink()
    with pytest.raises(ArtifactMissingError, match=r"state\.json: missing"):
        load_into_fresh(path)
    with pytest.raises(ArtifactMissingError, match="no checkpoint directory"):
        load_into_fresh(path / "nope")


def test_damaged_state_json(trained: tuple[Path, TinyLM, torch.optim.AdamW]) -> None:
    path = trained[0]
    raw = (path / "state.json").read_bytes()
    (path / "state.json").write_bytes(raw[:100])
    with pytest.raises(ArtifactUnreadableError, match=r"state\.json: not valid JSON"):
        load_into_fresh(path)
    doc = json.loads(raw)
    (path / "state.json").write_bytes(json.dumps({**doc, "version": 2}).encode())
    with pytest.raises(IntegrityError, match="format version 2; this flowpin reads version 1"):
        load_into_fresh(path)
    (path / "state.json").write_bytes(json.dumps({**doc, "step": "3"}).encode())
    with pytest.raises(IntegrityError, match="field 'step'"):
        load_into_fresh(path)


def test_shape_and_dtype_mismatch_name_file_and_tensor(trained: tuple[Path, TinyLM, torch.optim.AdamW]) -> None:
    path = trained[0]
    wide = TinyLM(vocab=V + 1)
    with pytest.raises(
        IntegrityError,
        match=r"model\.safetensors: tensor embed\.weight is float32\[48, 16\] in the checkpoint, float32\[49, 16\]",
    ):
        load_checkpoint(path, model=wide, optimizer=None)
    half = TinyLM().to(torch.float64)
    with pytest.raises(
        IntegrityError,
        match=r"model\.safetensors: tensor mixer_t is float32\[16, 3\] in the checkpoint, float64\[16, 3\]",
    ):
        load_checkpoint(path, model=half, optimizer=None)
    untied = TinyLM()
    untied.head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    with pytest.raises(IntegrityError, match=r"ties .*head\.weight.* but the model ties no tensors"):
        load_checkpoint(path, model=untied, optimizer=None)
    model, _ = make()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(IntegrityError, match=r"optimizer\.safetensors: saved by optimizer torch\.optim\.adamw\.AdamW"):
        load_checkpoint(path, model=model, optimizer=sgd)
    groups: list[dict[str, Any]] = [{"params": [model.embed.weight]}, {"params": list(model.norm.parameters())}]
    regrouped = torch.optim.AdamW(groups)
    with pytest.raises(IntegrityError, match=r"1 param group.* in the checkpoint, 2 in the optimizer"):
        load_checkpoint(path, model=model, optimizer=regrouped)


def test_nothing_is_changed_when_verification_fails(trained: tuple[Path, TinyLM, torch.optim.AdamW]) -> None:
    path = trained[0]
    model, opt = make(seed=9)
    before = weights(model)
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        load_checkpoint(path, model=model, optimizer=opt)
    assert weights(model) == before


# --- atomicity ------------------------------------------------------------------------------------


def test_crash_mid_save_leaves_nothing_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make()
    train_steps(model, opt, range(1))
    runs = tmp_path / "checkpoints"
    save_checkpoint(runs / checkpoint_name(10), state_at(10), model=model, optimizer=opt)
    real = ckpt._write_tensors
    calls: list[Path] = []

    def crash_after_first(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        if calls:
            raise KeyboardInterrupt("killed mid-save")
        calls.append(path)
        return real(path, tensors)

    monkeypatch.setattr(ckpt, "_write_tensors", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(runs / checkpoint_name(20), state_at(20), model=model, optimizer=opt)
    with pytest.raises(KeyboardInterrupt):  # replacing an existing checkpoint: the old one must survive
        save_checkpoint(runs / checkpoint_name(10), state_at(11), model=model, optimizer=opt)
    assert calls and calls[0].parent.name.startswith(".step-000020.")  # it did write into a temporary
    assert sorted(p.name for p in runs.iterdir()) == ["step-000010"]
    with pytest.raises(ArtifactMissingError):
        load_into_fresh(runs / checkpoint_name(20))
    assert load_into_fresh(runs / checkpoint_name(10)).step == 10
    latest = latest_checkpoint(runs)
    assert latest is not None and latest.step == 10


def test_list_checkpoints_ignores_temporaries(tmp_path: Path) -> None:
    model, opt = make()
    for step in (30, 10, 20):
        save_checkpoint(tmp_path / checkpoint_name(step), state_at(step), model=model, optimizer=opt)
    (tmp_path / ".step-000040.abc.tmp").mkdir()  # what a SIGKILL mid-save leaves
    (tmp_path / "step-000050").mkdir()  # no state.json: not a checkpoint
    (tmp_path / "notes").mkdir()
    assert [(r.path.name, r.step) for r in list_checkpoints(tmp_path)] == [
        ("step-000010", 10),
        ("step-000020", 20),
        ("step-000030", 30),
    ]
    assert list_checkpoints(tmp_path / "absent") == [] and latest_checkpoint(tmp_path / "absent") is None
    assert checkpoint_name(1234567) == "step-1234567"


def test_remove_stale_temporaries(tmp_path: Path) -> None:
    model, opt = make()
    save_checkpoint(tmp_path / checkpoint_name(10), state_at(10), model=model, optimizer=opt)
    stale = [tmp_path / ".step-000020.k2j3.tmp", tmp_path / ".step-000010.old-4242"]
    keep = [tmp_path / ".cache", tmp_path / "step-000030.tmp", tmp_path / ".step-x.tmp"]
    for d in stale + keep:
        d.mkdir()
    assert ckpt.remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in keep] + ["step-000010"])


def test_unserialisable_state_is_refused_before_writing(tmp_path: Path) -> None:
    model, opt = make()
    with pytest.raises(CanonicalError, match=r"state\.json"):
        save_checkpoint(tmp_path / "ck", state_at(0, metrics={"loss": float("nan")}), model=model, optimizer=opt)
    assert not (tmp_path / "ck").exists()
    odd = TinyLM()
    odd.register_buffer("c", torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(CanonicalError, match=r"c has dtype torch\.complex128"):
        save_checkpoint(tmp_path / "ck", state_at(0), model=odd, optimizer=opt)
