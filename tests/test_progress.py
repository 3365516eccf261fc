"""Progress bars: silent unless a person watches a terminal, drawn when one does, and never in a result."""

from __future__ import annotations

import contextlib
import io
import os
import pty
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import flowpin.progress as progress_mod
from flowpin.cli import main as flowpin_main
from flowpin.hashing import Hasher, reporting_progress
from flowpin.manifest.statement import load_manifest
from flowpin.progress import (
    PollingProgress,
    Progress,
    callback_progress,
    hash_progress,
    progress_enabled,
    step_progress,
    track,
)
from helpers import Project


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FLOWPIN_PROGRESS", raising=False)


# --- when a bar renders ----------------------------------------------------------------------------


def test_only_a_terminal_gets_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    assert progress_enabled(_Terminal()) is True
    assert progress_enabled(io.StringIO()) is False  # piped / redirected
    assert progress_enabled(io.StringIO(), force=True) is True
    assert progress_enabled(_Terminal(), force=False) is False
    monkeypatch.setenv("FLOWPIN_PROGRESS", "0")
    assert progress_enabled(_Terminal()) is False
    monkeypatch.setenv("FLOWPIN_PROGRESS", "1")
    monkeypatch.setenv("CI", "true")
    assert progress_enabled(_Terminal()) is False  # CI logs never get bars, even from a pseudo-terminal
    monkeypatch.setenv("CI", "false")
    assert progress_enabled(_Terminal()) is True
    with open(os.devnull, "w") as closed:
        pass
    assert progress_enabled(closed) is False  # isatty() of a closed file raises: no bar, no crash


def test_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress("work", total=10) as bar:
        assert bar.enabled is False
        for _ in range(10):
            bar.update()
        bar.describe("job 3")
    assert list(track(range(5), "loop")) == [0, 1, 2, 3, 4]
    with hash_progress() as hook, step_progress("train") as on_step:
        assert hook is None and on_step is None  # hooked code skips even the bookkeeping
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_renders_when_forced() -> None:
    stream = io.StringIO()
    with Progress("sweep", total=4, unit="run", force=True, stream=stream) as bar:
        for i in range(4):
            bar.describe(f"job {i}")
            bar.update()
    text = stream.getvalue()
    assert "sweep" in text and "4/4" in text and "100%" in text
    stream = io.StringIO()
    assert list(track(["a", "b"], "items", force=True, stream=stream)) == ["a", "b"]
    assert "2/2" in stream.getvalue()


def test_a_callback_starts_a_new_bar_for_each_series() -> None:
    stream = io.StringIO()
    with callback_progress("hashing", unit="B", force=True, stream=stream) as hook:
        assert hook is not None
        for done in (0, 512, 1024):
            hook(done, 1024)
        for done in (0, 10, 2048):
            hook(done, 2048)
    text = stream.getvalue()
    assert "1.00k/1.00k" in text and "2.00k/2.00k" in text  # binary prefixes for bytes


def test_a_polling_bar_follows_work_done_elsewhere(tmp_path: Path) -> None:
    """E.g. a sweep's jobs, counted from their state files while other processes run them."""
    state = tmp_path / "done.txt"
    state.write_text("3")

    def poll() -> tuple[int, int | None]:
        return int(state.read_text()), 3  # OSError while the file is missing

    stream = io.StringIO()
    with PollingProgress("sweep", poll, interval=0.01, unit="job", force=True, stream=stream):
        pass
    assert "sweep" in stream.getvalue() and "3/3" in stream.getvalue()  # close() polls once more

    state.unlink()
    stream = io.StringIO()
    with PollingProgress("sweep", poll, interval=0.01, unit="job", force=True, stream=stream):
        pass  # every poll fails: skipped, never raised into the work
    assert "sweep" in stream.getvalue() and "3/3" not in stream.getvalue()

    calls: list[str] = []

    def counting_poll() -> tuple[int, int | None]:
        calls.append("poll")
        return 0, 1

    PollingProgress("sweep", counting_poll, stream=io.StringIO()).close()
    assert calls == []  # not a terminal: no thread, no polling


# --- a pseudo-terminal: what a person at a shell sees ---------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from flowpin.progress import Progress, callback_progress

    with Progress("stage work", total=3, unit="step") as bar:
        for _ in range(3):
            bar.update()
    with callback_progress("hashing", unit="B") as hook:
        if hook is not None:
            hook(0, 4096)
            hook(4096, 4096)
    print("done", flush=True)
    """
)


def _run_on_pty(script: Path, env: dict[str, str]) -> str:
    """Run ``script`` with stderr (and stdout) on a pseudo-terminal; return all it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_pseudo_terminal_gets_bars_and_a_pipe_does_not(tmp_path: Path) -> None:
    script = tmp_path / "bars.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "FLOWPIN_PROGRESS")}
    seen = _run_on_pty(script, env)
    assert "stage work" in seen and "3/3" in seen and "4.00k/4.00k" in seen and "done" in seen
    assert "stage work" not in _run_on_pty(script, {**env, "FLOWPIN_PROGRESS": "0"})
    assert "stage work" not in _run_on_pty(script, {**env, "CI": "1"})
    piped = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True)
    assert piped.stderr == "" and piped.stdout == "done\n"


# --- the hooks: hashing, the training loop, the CLI, record() -------------------------------------


def _tree(root: Path, n: int, size: int) -> None:
    (root / "art").mkdir(parents=True)
    for i in range(n):
        (root / "art" / f"f{i:03d}.bin").write_bytes(bytes([i % 251]) * size)


@pytest.mark.parametrize("workers", [1, 2])
def test_hasher_reports_bytes_and_digests_do_not_change(tmp_path: Path, workers: int) -> None:
    _tree(tmp_path, 80, 5000)  # 80 files: over the in-process limit, so workers=2 forks
    calls: list[tuple[int, int]] = []
    hooked = Hasher(tmp_path, workers=workers, progress=lambda d, t: calls.append((d, t))).digest("art")
    plain = Hasher(tmp_path, workers=workers).digest("art")
    assert hooked == plain
    assert calls[0] == (0, 80 * 5000) and calls[-1] == (80 * 5000, 80 * 5000)
    assert all(t == 80 * 5000 and 0 <= d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_reporting_progress_reaches_hashers_built_inside_the_block(tmp_path: Path) -> None:
    _tree(tmp_path, 3, 100)
    calls: list[tuple[int, int]] = []
    with reporting_progress(lambda d, t: calls.append((d, t))):
        Hasher(tmp_path, workers=1).digest("art")  # built by library code that knows no terminal
    assert calls[-1] == (300, 300)
    calls.clear()
    Hasher(tmp_path, workers=1).digest("art")
    assert calls == []  # the block is over


def test_training_loop_reports_steps_and_trains_the_same_bits(tmp_path: Path, one_torch_thread: None) -> None:
    import hashlib

    import torch
    from torch import nn

    from flowpin.data.order import DataOrder
    from flowpin.train.loop import OptimConfig, TrainConfig, seed_all, train
    from flowpin.train.schedule import ScheduleConfig

    vocab, length, batch = 16, 8, 2
    order = DataOrder(n_sequences=10, dataset_digest=hashlib.sha256(b"p").hexdigest(), order_seed=1, batch_size=batch)

    class Counting:
        """Sequence i counts up from i: a pure function of the step (a BatchSource)."""

        def __init__(self) -> None:
            self.order = order

        def __call__(self, step: int) -> torch.Tensor:
            return torch.stack([(torch.arange(length) + i) % vocab for i in order.batch(step)])

    data = Counting()

    def loss_fn(model: nn.Module, b: torch.Tensor) -> torch.Tensor:
        logits = model(b[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), b[:, 1:].reshape(-1))

    schedule = ScheduleConfig(total_steps=6, warmup_steps=1, peak_lr=1e-2, min_lr=1e-3)
    cfg = TrainConfig(
        steps=6, batch_size=batch, seed=3, checkpoint_every=3, log_every=3, optim=OptimConfig(schedule=schedule)
    )

    def run(run_dir: Path, hook: progress_mod.ProgressHook | None) -> bytes:
        seed_all(0)
        model = nn.Sequential(nn.Embedding(vocab, 8), nn.Linear(8, vocab))
        result = train(model=model, loss_fn=loss_fn, data=data, cfg=cfg, run_dir=run_dir, progress=hook)
        return (result.checkpoints[-1].path / "model.safetensors").read_bytes()

    calls: list[tuple[int, int]] = []
    with_bar = run(tmp_path / "a", lambda s, t: calls.append((s, t)))
    assert calls == [(s, 6) for s in range(1, 7)]
    assert run(tmp_path / "b", None) == with_bar


@contextlib.contextmanager
def _recording_hook(calls: list[tuple[int, int]]) -> Iterator[progress_mod.ProgressHook]:
    yield lambda d, t: calls.append((d, t))


def test_cli_hashing_reports_to_the_terminal_hook(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = project.record_stage("train")
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(progress_mod, "hash_progress", lambda *a, **k: _recording_hook(calls))
    monkeypatch.chdir(project.root)
    monkeypatch.setenv("FLOWPIN_ROOT", str(project.root))
    assert flowpin_main(["verify", "--no-cache", str(manifest)]) == 0
    assert calls and calls[-1][0] == calls[-1][1] > 0  # verify's hashing reached the hook, to the end


def test_record_with_a_bar_pins_the_same_identity(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = load_manifest(project.record_stage("train"))
    monkeypatch.setattr(progress_mod, "progress_enabled", lambda *a, **k: True)  # as on a terminal
    barred = load_manifest(project.record_stage("train"))
    assert barred.subjects == plain.subjects and barred.dependencies == plain.dependencies
