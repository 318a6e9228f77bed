"""CRD through the Trainer: interrupted mid-epoch and resumed, bit-identical to a straight run
(banks, Z and the heads in the checkpoint; negatives seeded by the global step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quest.core.checkpoint import load_checkpoint
from quest.core.data.prepared import load_prepared
from quest.core.engine import Trainer
from quest.core.methods import MethodContext, get, resolve_settings
from quest.core.models.zoo import build_model
from quest.infra.config import OptimConfig, StudentConfig
from tests.test_resume import EPOCHS, SignalAt, assert_same_run, make_loaders, one_thread  # noqa: F401


def make_crd_trainer(ckpt: Path, labels: torch.Tensor) -> Trainer:
    torch.manual_seed(0)
    opt = OptimConfig(epochs=EPOCHS, batch_size=20, lr=0.05, schedule="onecycle", nesterov=True)
    settings = resolve_settings(StudentConfig.model_validate({"crd": {"nce_k": 64}}))
    d = get("crd").build(MethodContext(build_model("resnet8", 10), build_model("resnet8", 10),
                                       settings, train_labels=labels))
    return Trainer(d, opt, checkpoint_path=ckpt, fingerprint="fp", num_classes=10,
                   progress="off", desc="t")


@pytest.mark.parametrize(("kind", "epoch", "step"), [("memory", 1, 2), ("dataloader", 0, 3)])
def test_crd_resumes_bit_identically(tmp_path: Path, smoke_prepared: Path, kind: str,
                                     epoch: int, step: int) -> None:
    labels = torch.from_numpy(load_prepared(smoke_prepared).train.labels[:100]).long()
    straight = make_crd_trainer(tmp_path / "straight.pt", labels)
    straight.fit(*make_loaders(smoke_prepared, kind))
    ckpt = tmp_path / "resumed.pt"
    train, test = make_loaders(smoke_prepared, kind)
    first = make_crd_trainer(ckpt, labels)
    with pytest.raises(KeyboardInterrupt):
        first.fit(SignalAt(train, epoch, step), test)
    saved = load_checkpoint(ckpt)["distiller"]
    assert {"memory_s", "memory_t", "z_s", "z_t", "embed_s.linear.weight"} <= set(saved)
    second = make_crd_trainer(ckpt, labels)
    second.fit(*make_loaders(smoke_prepared, kind))
    for name in ("memory_s", "memory_t", "z_s", "z_t"):
        assert torch.equal(getattr(second.distiller, name), getattr(straight.distiller, name))
    assert torch.equal(second.distiller.embed_t.linear.weight,
                       straight.distiller.embed_t.linear.weight)
    assert_same_run(straight, second)
