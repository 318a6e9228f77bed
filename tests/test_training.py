"""Teacher training and import on real CIFAR-10 slices, checkpoints, resume and NaN handling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from quest.apps.stages.teacher import import_teacher
from quest.core.checkpoint import load_checkpoint
from quest.core.data.loader import InMemoryLoader
from quest.core.data.prepared import load_prepared
from quest.core.distill import Distiller
from quest.core.engine import Trainer, evaluate, lr_at
from quest.core.models.zoo import build_model
from quest.infra.config import OptimConfig
from quest.infra.errors import QuestError


def loaders(prepared: Path, batch: int = 50, seed: int = 0) -> tuple[InMemoryLoader, ...]:
    ds = load_prepared(prepared)
    mean, std = ds.meta["mean"], ds.meta["std"]
    train = InMemoryLoader(ds.train.images, ds.train.labels, batch_size=batch, mean=mean,
                           std=std, train=True, seed=seed)
    test = InMemoryLoader(ds.test.images, ds.test.labels, batch_size=100, mean=mean, std=std,
                          train=False)
    return train, test


def make_trainer(tmp: Path, epochs: int, lr: float = 0.05, name: str = "t") -> Trainer:
    torch.manual_seed(0)
    opt = OptimConfig(epochs=epochs, batch_size=50, lr=lr, schedule="onecycle", nesterov=True)
    return Trainer(Distiller(build_model("resnet8", 10)), opt, checkpoint_path=tmp / f"{name}.pt",
                   fingerprint="fp", num_classes=10, progress="off", desc=name)


@pytest.mark.slow
def test_teacher_training_on_smoke_slice_beats_chance(tmp_path: Path,
                                                      smoke_prepared: Path) -> None:
    train, test = loaders(smoke_prepared)
    history = make_trainer(tmp_path, epochs=8, lr=0.1).fit(train, test)
    assert len(history) == 8
    assert history[-1]["loss"] < history[0]["loss"]
    # 300 training images, 100 test images, 10 classes: chance is 0.10
    assert history[-1]["train_accuracy"] > 0.25
    assert max(r["test_accuracy"] for r in history) > 0.16


@pytest.mark.slow
def test_interrupted_training_resumes_to_identical_weights(tmp_path: Path,
                                                           smoke_prepared: Path) -> None:
    train, test = loaders(smoke_prepared)
    straight = make_trainer(tmp_path, epochs=3, name="straight")
    straight.fit(train, test)

    class Stop(Exception):
        pass

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 1:
            raise Stop

    first = make_trainer(tmp_path, epochs=3, name="resumed")
    with pytest.raises(Stop):
        first.fit(train, test, on_epoch=stop_after_first)
    second = make_trainer(tmp_path, epochs=3, name="resumed")
    history = second.fit(train, test)
    assert second.start_epoch == 1 and len(history) == 3
    a = straight.distiller.student.state_dict()
    b = second.distiller.student.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path: Path,
                                                               smoke_prepared: Path) -> None:
    """Epoch 1 trains and checkpoints; then the learning rate blows up and epoch 2's loss goes
    non-finite: the error names the checkpoint, which still holds epoch 1's weights."""
    train, test = loaders(smoke_prepared)
    trainer = make_trainer(tmp_path, epochs=2)
    good: dict[str, torch.Tensor] = {}

    def diverge(record: dict) -> None:
        good.update({k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()})
        trainer.opt = trainer.opt.model_copy(update={"lr": 1e6})

    with pytest.raises(QuestError, match="lower the learning rate") as err:
        trainer.fit(train, test, on_epoch=diverge)
    path = tmp_path / "t.pt"
    assert re.search(rf"loss became (nan|inf) in epoch 2 \(the last good checkpoint stays in "
                     rf"{re.escape(str(path))}\)", str(err.value)), str(err.value)
    ckpt = load_checkpoint(path)
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["history"])) == (1, 0, 1)
    assert "partial" not in ckpt and ckpt["fingerprint"] == "fp"
    assert ckpt["distiller"].keys() == good.keys()
    for key, value in ckpt["distiller"].items():
        torch.testing.assert_close(value, good[key], atol=0, rtol=0, msg=key)
    # the weights in memory did go bad: the checkpoint is the one from before
    assert not all(torch.isfinite(v).all() for v in trainer.distiller.state_dict().values()
                   if v.is_floating_point())


def test_lr_schedules() -> None:
    step = OptimConfig(epochs=240, lr=0.05, schedule="step", milestones=[150, 180, 210])
    assert lr_at(step, 0) == 0.05 and lr_at(step, 150) == pytest.approx(0.005)
    assert lr_at(step, 215) == pytest.approx(0.00005)
    one = OptimConfig(epochs=10, lr=0.1, schedule="onecycle", warmup_fraction=0.2)
    assert lr_at(one, 0) == pytest.approx(0.004)
    assert lr_at(one, 2) == pytest.approx(0.1)
    assert lr_at(one, 10) == pytest.approx(0.0, abs=1e-9)


def test_shared_teacher_imports_and_evaluates(smoke_prepared: Path,
                                              teacher_checkpoint: Path) -> None:
    ds = load_prepared(smoke_prepared)
    model, info = import_teacher("resnet56", teacher_checkpoint, 10, ds.classes)
    assert len(info["checkpoint_sha256"]) == 64
    _, test = loaders(smoke_prepared)
    ev = evaluate(model, test, 10)
    # 86.4 % on the full test split; 100 images leave room for sampling noise
    assert ev["top1"] > 0.7


def test_mismatched_checkpoint_lists_the_differences(tmp_path: Path,
                                                     teacher_checkpoint: Path) -> None:
    with pytest.raises(QuestError, match="is a resnet56, not a resnet20"):
        import_teacher("resnet20", teacher_checkpoint, 10)
    bare = tmp_path / "bare.pt"
    torch.save(build_model("resnet20", 100).state_dict(), bare)
    with pytest.raises(QuestError) as err:
        import_teacher("resnet56", bare, 10)
    msg = str(err.value)
    assert "missing" in msg and "shape mismatch fc.weight" in msg and "\n" not in msg
    ok = tmp_path / "ok.pt"
    torch.save({"model": build_model("resnet20", 10).state_dict(), "epoch": 3}, ok)
    model, _ = import_teacher("resnet20", ok, 10)
    assert model.fc.out_features == 10


def test_pickled_code_in_checkpoint_is_refused(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(QuestError, match="refused|cannot be read"):
        import_teacher("resnet8", bad, 10)
