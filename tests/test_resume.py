"""Interrupted training: a mid-epoch checkpoint, and a resume that reaches identical weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from quest.core.checkpoint import load_checkpoint
from quest.core.data.loader import EpochLoader, InMemoryLoader, make_dataloader
from quest.core.data.prepared import load_prepared
from quest.core.distill import Batch, Distiller, StepContext
from quest.core.engine import Trainer
from quest.core.models.zoo import build_model
from quest.infra.config import OptimConfig

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test runs it

EPOCHS = 2


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two spinning threads cost 20x the time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stream_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An indexed stream: 10 classes x 10 training JPEGs of mixed sizes, cropped to 32 px."""
    from quest.apps.shards import make_image_folder
    from quest.apps.stages.prepare import run_prepare
    from quest.infra.config import load_config
    from quest.infra.paths import Paths

    root = tmp_path_factory.mktemp("stream")
    folder = make_image_folder(root / "images", classes=10, train_per_class=10,
                               test_per_class=5, sides=(40, 90))
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", "stream-tiny",
                      [f"data.location={folder}", "data.image_size=32", "data.workers=0"])
    run_prepare(cfg, Paths(root))
    return root / "data" / "prepared"


def make_stream_loaders(prepared: Path) -> tuple[Any, Any]:
    """The stream's 100 training images in 5 batches of 20, its 50 test images (2 workers)."""
    from quest.core.data.stream import StreamLoader, open_stream
    from quest.infra.io_utils import read_json

    data = open_stream(prepared, read_json(prepared / "meta.json"))
    common = {"mean": data.meta["mean"], "std": data.meta["std"], "workers": 2}
    return (StreamLoader(data, "train", train=True, batch_size=20, seed=3, **common),
            StreamLoader(data, "test", train=False, batch_size=50, **common))


def make_loaders(prepared: Path, kind: str) -> tuple[Any, Any]:
    """100 training images in 5 batches of 20 (a few steps keep the test fast), 50 test images."""
    if kind == "stream":
        return make_stream_loaders(prepared)
    ds = load_prepared(prepared)
    mean, std = ds.meta["mean"], ds.meta["std"]
    images, labels = ds.train.images[:100], ds.train.labels[:100]
    test = InMemoryLoader(ds.test.images[:50], ds.test.labels[:50], batch_size=50, mean=mean,
                          std=std, train=False)
    if kind == "memory":
        train = InMemoryLoader(images, labels, batch_size=20, mean=mean, std=std, train=True,
                               seed=3)
    else:
        dl = make_dataloader(images, labels, batch_size=20, mean=mean, std=std, train=True,
                             seed=3)
        train = EpochLoader(dl, torch.device("cpu"), channels_last=False)
    return train, test


def make_trainer(ckpt: Path) -> Trainer:
    torch.manual_seed(0)
    opt = OptimConfig(epochs=EPOCHS, batch_size=20, lr=0.05, schedule="onecycle", nesterov=True)
    return Trainer(Distiller(build_model("resnet8", 10)), opt, checkpoint_path=ckpt,
                   fingerprint="fp", num_classes=10, progress="off", desc="t")


class SignalAt:
    """A train loader that sends this process SIGINT as it hands out batch `step` of `epoch`."""

    def __init__(self, loader: Any, epoch: int, step: int) -> None:
        self.loader, self.at, self.epoch = loader, (epoch, step), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if (self.epoch, i) == self.at:
                os.kill(os.getpid(), signal.SIGINT)  # handled before os.kill returns
            yield batch


def assert_same_run(a: Trainer, b: Trainer) -> None:
    sa, sb = a.distiller.student.state_dict(), b.distiller.student.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert len(a.history) == len(b.history) == EPOCHS
    for ra, rb in zip(a.history, b.history, strict=True):
        for key in ("loss", "ce", "lr", "train_accuracy", "test_accuracy", "test_loss"):
            assert ra[key] == rb[key], key


@pytest.mark.parametrize(("kind", "epoch", "step"),
                         [("memory", 0, 1), ("memory", 1, 3), ("dataloader", 1, 2),
                          ("stream", 1, 2)])
def test_sigint_mid_epoch_resumes_to_identical_weights(
    tmp_path: Path, smoke_prepared: Path, kind: str, epoch: int, step: int,
    request: pytest.FixtureRequest,
) -> None:
    """The stream resumes by starting its sampler after the trained batches (start_at), the
    others by redrawing them: either way the weights equal an uninterrupted run's."""
    if kind == "stream":
        smoke_prepared = request.getfixturevalue("stream_prepared")
    straight = make_trainer(tmp_path / "straight.pt")
    straight.fit(*make_loaders(smoke_prepared, kind))

    ckpt = tmp_path / "resumed.pt"
    train, test = make_loaders(smoke_prepared, kind)
    first = make_trainer(ckpt)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        first.fit(SignalAt(train, epoch, step), test)
    assert signal.getsignal(signal.SIGINT) is previous  # the trainer's handler is gone again
    state = load_checkpoint(ckpt)
    # batch `step` was trained before stopping: step + 1 batches of that epoch are done
    assert (state["epoch"], state["step"]) == (epoch, step + 1)
    assert state["partial"]["seen"] == 20 * (step + 1)
    assert len(state["history"]) == epoch

    second = make_trainer(ckpt)
    second.fit(*make_loaders(smoke_prepared, kind))
    assert (second.start_epoch, second.start_step) == (epoch, step + 1)
    assert_same_run(straight, second)


def test_second_signal_stops_at_once_and_keeps_the_last_checkpoint(
    tmp_path: Path, smoke_prepared: Path
) -> None:
    class TwoSignals(SignalAt):
        def __iter__(self) -> Iterator[Any]:
            for i, batch in enumerate(self.loader):
                if (self.epoch, i) == self.at:
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)  # impatient: the second one raises here
                yield batch

    ckpt = tmp_path / "t.pt"
    train, test = make_loaders(smoke_prepared, "memory")
    trainer = make_trainer(ckpt)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(TwoSignals(train, 1, 2), test)
    state = load_checkpoint(ckpt)
    assert (state["epoch"], state["step"]) == (1, 0)  # the end-of-epoch-1 checkpoint, untouched


class BankDistiller(Distiller):
    """A stateful method in miniature (CRD's momentum memory bank): a buffer with one row per
    training sample, updated from `batch.indices` every step, read back by the loss (so the
    bank steers the weights), weighted by a warm-up on the step context."""

    name = "bank"

    def __init__(self, student: torch.nn.Module, samples: int, classes: int) -> None:
        super().__init__(student)
        self.register_buffer("bank", torch.full((samples, classes), 1.0 / classes))
        self.register_buffer("updates", torch.zeros(samples, dtype=torch.long))
        self.seen: list[tuple[int, int, int, int, list[int]]] = []

    def step(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(batch.images)
        idx = batch.indices
        assert idx is not None
        self.seen.append((ctx.epoch, ctx.epochs, ctx.step, ctx.total_steps, idx.tolist()))
        # a pull towards what the bank remembers of the batch's neighbours
        memory = self.bank[idx.roll(1)]
        pull = -(logits.log_softmax(dim=1) * memory).sum(dim=1).mean()
        with torch.no_grad():
            self.bank[idx] = 0.5 * self.bank[idx] + 0.5 * logits.softmax(dim=1)
            self.updates[idx] += 1
        return logits, {"ce": F.cross_entropy(logits, batch.labels),
                        "bank": (0.5 + ctx.progress) * pull}


def make_bank_trainer(ckpt: Path) -> Trainer:
    torch.manual_seed(0)
    opt = OptimConfig(epochs=EPOCHS, batch_size=20, lr=0.05, schedule="onecycle", nesterov=True)
    return Trainer(BankDistiller(build_model("resnet8", 10), 100, 10), opt, checkpoint_path=ckpt,
                   fingerprint="fp", num_classes=10, progress="off", desc="t")


@pytest.mark.parametrize(("kind", "epoch", "step"), [("memory", 1, 2), ("stream", 0, 3)])
def test_stateful_method_checkpoints_its_memory_bank_and_resumes_bit_identically(
    tmp_path: Path, smoke_prepared: Path, kind: str, epoch: int, step: int,
    request: pytest.FixtureRequest,
) -> None:
    """A memory bank indexed by sample, interrupted mid-epoch: the checkpoint holds the bank,
    and the resumed run sees the same indices and step contexts as an uninterrupted one and
    ends with the same weights and the same bank, bit for bit."""
    if kind == "stream":
        smoke_prepared = request.getfixturevalue("stream_prepared")
    straight = make_bank_trainer(tmp_path / "straight.pt")
    straight.fit(*make_loaders(smoke_prepared, kind))
    bank = straight.distiller.bank
    assert straight.distiller.updates.tolist() == [EPOCHS] * 100  # each sample once an epoch
    assert not torch.allclose(bank, torch.full_like(bank, 0.1))
    steps = 5  # 100 images in batches of 20
    assert [s[:4] for s in straight.distiller.seen] == [
        (e, EPOCHS, e * steps + i, EPOCHS * steps) for e in range(EPOCHS) for i in range(steps)]

    ckpt = tmp_path / "resumed.pt"
    train, test = make_loaders(smoke_prepared, kind)
    first = make_bank_trainer(ckpt)
    with pytest.raises(KeyboardInterrupt):
        first.fit(SignalAt(train, epoch, step), test)
    saved = load_checkpoint(ckpt)["distiller"]
    assert torch.equal(saved["bank"], first.distiller.bank)  # the bank is in the checkpoint
    assert int(saved["updates"].sum()) == 20 * (epoch * steps + step + 1)

    second = make_bank_trainer(ckpt)
    second.fit(*make_loaders(smoke_prepared, kind))
    done = epoch * steps + step + 1
    assert first.distiller.seen + second.distiller.seen == straight.distiller.seen
    assert len(second.distiller.seen) == EPOCHS * steps - done
    assert torch.equal(second.distiller.bank, bank)
    assert torch.equal(second.distiller.updates, straight.distiller.updates)
    assert_same_run(straight, second)


def _student_cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "quest", "student", "--root", str(root), "--preset",
            "smoke", "--method", "ce", "--set", "student.arch=resnet8",
            "--set", "student.train.batch_size=4", "--set", f"student.train.epochs={EPOCHS}",
            "--set", "runtime.threads=1", "--set", "runtime.progress=lines"]


def test_sigterm_mid_epoch_then_rerun_matches_an_uninterrupted_cli_run(
    smoke_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = tmp_path_factory.mktemp("reference")
    shutil.copy(smoke_root / "params.yaml", reference / "params.yaml")
    shutil.copytree(smoke_root / "data", reference / "data")
    # the uninterrupted run goes alongside (one thread each, its own root)
    straight = subprocess.Popen(_student_cmd(reference), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    ckpt = smoke_root / ".quest" / "checkpoints" / "student-ce.pt"
    proc = subprocess.Popen(_student_cmd(smoke_root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # epoch 1's checkpoint appearing means epoch 2 (75 steps of batch 4) is starting
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ckpt.exists(), f"epoch 1 did not finish in time (exit {proc.poll()})"
    # the checkpoint is written before epoch 1's log line; a signal in that gap stops the run
    # after epoch 1, not mid-epoch (a loaded machine hit it once): let epoch 2 get going
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("quest: interrupted")
    assert "Traceback" not in err
    assert list(smoke_root.rglob("*.tmp")) == []
    assert not (smoke_root / "models" / "students" / "ce.pt").exists()
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and 0 < state["step"] < 75, (state["epoch"], state["step"], err)

    rerun = subprocess.run(_student_cmd(smoke_root), capture_output=True, text=True,
                           timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after epoch 1 and step {state['step']} of epoch 2" in rerun.stderr
    assert not ckpt.exists()  # dropped once the outputs are written
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    a = torch.load(reference / "models" / "students" / "ce.pt", weights_only=True)["model"]
    b = torch.load(smoke_root / "models" / "students" / "ce.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ha = json.loads((reference / "metrics" / "students" / "ce.json").read_text())["history"]
    hb = json.loads((smoke_root / "metrics" / "students" / "ce.json").read_text())["history"]
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("loss", "train_accuracy", "test_accuracy", "test_loss", "lr"):
            assert ra[key] == rb[key], key
