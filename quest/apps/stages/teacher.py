"""Teacher stage: import a checkpoint or train the teacher, evaluate it, save models/teacher/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quest.apps.stages.common import (
    corrupt_metrics,
    load_data,
    make_loaders,
    norm_stats,
    resolve_device,
    resolve_location,
    to_device,
    write_csv_atomic,
)
from quest.apps.stages.splits import evaluate_splits
from quest.core.checkpoint import (
    extract_state_dict,
    load_checkpoint,
    load_state_strict,
    save_model_file,
)
from quest.core.data.prepared import data_hash
from quest.core.distill import Distiller
from quest.core.engine import Trainer
from quest.core.models.zoo import build_model, count_macs, count_parameters
from quest.infra.config import Config, config_hash
from quest.infra.errors import QuestError
from quest.infra.io_utils import file_sha256, write_json_atomic
from quest.infra.paths import Paths
from quest.infra.progress import log


def import_teacher(
    arch: str, checkpoint: str | Path, num_classes: int, classes: list[str] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build `arch` and load a checkpoint into it strictly (bare state_dict or {'model': ...})."""
    obj = load_checkpoint(checkpoint)
    if classes is not None and isinstance(obj.get("classes"), list | tuple):
        if list(obj["classes"]) != list(classes):
            raise QuestError(
                f"teacher checkpoint {checkpoint} was trained on classes {list(obj['classes'])[:4]}"
                f"... which differ from the data's {list(classes)[:4]}...: use a matching dataset"
            )
    ck_arch = obj.get("arch")
    if isinstance(ck_arch, str) and ck_arch != arch:
        raise QuestError(
            f"teacher checkpoint {checkpoint} is a {ck_arch}, not a {arch}: "
            f"set teacher.arch: {ck_arch}"
        )
    model = build_model(arch, num_classes)
    load_state_strict(model, extract_state_dict(obj), f"teacher checkpoint {checkpoint}")
    return model, {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint)}


def _train_teacher(cfg: Config, paths: Paths, ds: Any, device: torch.device
                   ) -> tuple[torch.nn.Module, Any, Trainer, list[dict[str, Any]]]:
    """Train the teacher here (teacher.checkpoint unset): (model, test loader, trainer,
    per-epoch history); the trainer is finished by the caller once the model is written."""
    t = cfg.teacher
    torch.manual_seed(t.train.seed)
    model = to_device(build_model(t.arch, len(ds.classes)), device, cfg.runtime.channels_last)
    train_loader, test_loader = make_loaders(ds, cfg, t.train, device)
    fingerprint = config_hash({"teacher": config_hash(t), "data": data_hash(paths.prepared)})
    trainer = Trainer(
        Distiller(model),
        t.train,
        checkpoint_path=paths.checkpoint("teacher"),
        fingerprint=fingerprint,
        device=device,
        num_classes=len(ds.classes),
        progress=cfg.runtime.progress,
        desc="teacher",
    )
    history = trainer.fit(train_loader, test_loader)
    write_csv_atomic(paths.plots / "teacher.csv", history)
    return model, test_loader, trainer, history


def run_teacher(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Import or train the teacher; evaluate it on the test split; write model and metrics."""
    device = resolve_device(cfg)
    ds = load_data(paths)
    mean, std = norm_stats(ds)
    num_classes = len(ds.classes)
    t = cfg.teacher
    history: list[dict[str, Any]] = []
    trainer: Trainer | None = None
    if t.checkpoint:
        ckpt = resolve_location(t.checkpoint, paths.root)
        assert ckpt is not None
        model, source = import_teacher(t.arch, ckpt, num_classes, ds.classes)
        log.info("teacher: imported %s from %s", t.arch, ckpt)
        model = to_device(model, device, cfg.runtime.channels_last)
        _, test_loader = make_loaders(ds, cfg, t.train, device)
    else:
        model, test_loader, trainer, history = _train_teacher(cfg, paths, ds, device)
        source = {"trained": True, "epochs": t.train.epochs}
    ev = evaluate_splits(model, ds, cfg, device, test_loader)
    image_shape = ds.image_shape
    metrics = {
        "arch": t.arch,
        "top1": ev["top1"],
        "top5": ev["top5"],
        # an imported teacher may have trained on the images held out for validation (the
        # shared CIFAR-10 one saw the whole training set): its val_top1 is then no held-out
        # number; no choice reads it
        **{k: ev[k] for k in ("val_top1", "val_top5") if k in ev},
        "params": count_parameters(model),
        "macs": count_macs(model, image_shape),
        **source,
        **corrupt_metrics(ds),
    }
    save_model_file(
        paths.teacher_model,
        model,
        arch=t.arch,
        num_classes=num_classes,
        classes=list(ds.classes),
        mean=mean,
        std=std,
        top1=ev["top1"],
    )
    write_json_atomic(paths.metrics / "teacher.json", {**metrics, "history": history})
    if trainer is not None:
        trainer.finish()
    log.info("teacher %s: top-1 %.4f top-5 %.4f", t.arch, ev["top1"], ev["top5"])
    return metrics
