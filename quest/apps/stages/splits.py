"""Evaluation on both splits: the test split (reported) and the validation split (what every
choice reads), for the stages that evaluate a model (teacher, student, evaluate).

Kept apart from common.py so that the stages that never evaluate (prepare) do not import the
training engine, and their caches stay valid when it changes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quest.apps.stages.common import Data, eval_loader, split_size
from quest.core.engine import evaluate
from quest.infra.config import Config


def val_loader(ds: Data, cfg: Config, device: torch.device) -> Any | None:
    """Un-augmented batches of the validation split, or None when the data has none."""
    if split_size(ds, "val") == 0:
        return None
    return eval_loader(ds, cfg, device, "val")


def evaluate_splits(model: nn.Module, ds: Data, cfg: Config, device: torch.device,
                    test: Any | None = None) -> dict[str, Any]:
    """A model's top-1/top-5 on the test split (`test`: its loader, when already built) and,
    when the data has one, on the validation split (val_top1, val_top5)."""
    num_classes = len(ds.classes)
    ev = evaluate(model, test if test is not None else eval_loader(ds, cfg, device),
                  num_classes, device)
    val = val_loader(ds, cfg, device)
    if val is not None:
        vev = evaluate(model, val, num_classes, device)
        ev.update({"val_top1": vev["top1"], "val_top5": vev["top5"],
                   "val_images": vev["num_images"]})
    return ev
