"""Student stage: train one student with one registered method (quest.core.methods) and save it."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from quest.apps.results import build_record, run_provenance, write_record
from quest.apps.stages.common import (
    corrupt_metrics,
    load_data,
    make_loaders,
    norm_stats,
    resolve_device,
    to_device,
    write_csv_atomic,
)
from quest.apps.stages.splits import val_loader
from quest.core import distributed
from quest.core.checkpoint import load_model_file, save_model_file
from quest.core.data.prepared import data_hash
from quest.core.engine import Trainer, evaluate
from quest.core.fastpath import autocast_step, describe, maybe_compile
from quest.core.levels import LevelInputs, level_paths, quest_levels
from quest.core.methods import MethodContext, get, resolve_settings
from quest.core.models.taps import tap_shapes
from quest.core.models.zoo import build_model, count_parameters, default_feature_layer
from quest.infra.config import Config, config_hash
from quest.infra.errors import QuestError
from quest.infra.io_utils import file_sha256, read_json, write_json_atomic
from quest.infra.paths import Paths
from quest.infra.progress import log


def student_channels(model: torch.nn.Module, layer: str, image_shape: tuple[int, ...]) -> int:
    """Channel count of a student's tapped layer, found with one dummy forward pass."""
    return tap_shapes(model, [layer], image_shape)[0][0]


# Students may be built in parallel threads (the Prefect flow); the global RNG must not interleave.
_INIT_LOCK = threading.Lock()


def _extra_levels(cfg: Config, paths: Paths, student: torch.nn.Module,
                  image_shape: tuple[int, ...], device: torch.device,
                  provenance: dict[str, Any]) -> list[LevelInputs]:
    """Each extra QuEST level's codebook and resolved layers (student.quest.extra_levels)."""
    out = []
    for level in quest_levels(cfg)[1:]:
        lp = level_paths(paths, level.name)
        if not lp.codebook.is_file():
            raise QuestError(f"{lp.codebook} does not exist: run `quest features --level "
                             f"{level.name}` and `quest codebook --level {level.name}` first")
        meta = read_json(lp.codebook_meta)
        provenance[f"codebook_{level.name}_sha256"] = meta["codebook_sha256"]
        assert level.student_layer  # validated: extra levels name both layers
        out.append(LevelInputs(
            level, torch.from_numpy(np.load(lp.codebook)).to(device), str(meta["layer"]),
            level.student_layer, student_channels(student, level.student_layer, image_shape),
            int(meta.get("pool", 1))))
    return out


def _codebook_context(cfg: Config, paths: Paths, student: torch.nn.Module,
                      image_shape: tuple[int, ...], device: torch.device,
                      provenance: dict[str, Any]) -> dict[str, Any]:
    """The codebook and layers a QuEST method needs, for every level (MethodContext fields)."""
    s = cfg.student
    if not paths.codebook.is_file():
        raise QuestError(f"{paths.codebook} does not exist: run `quest codebook` first")
    cb_meta = read_json(paths.codebook_meta)
    provenance["codebook_sha256"] = cb_meta["codebook_sha256"]
    s_layer = s.layer or default_feature_layer(s.arch)
    return {
        "codebook": torch.from_numpy(np.load(paths.codebook)).to(device),
        "teacher_layer": cb_meta["layer"],
        "teacher_pool": int(cb_meta.get("pool", 1)),
        "student_layer": s_layer,
        "student_channels": student_channels(student, s_layer, image_shape),
        "extra_levels": _extra_levels(cfg, paths, student, image_shape, device, provenance),
    }


def _train_labels(ds: Any) -> torch.Tensor | None:
    """The training split's labels in index order (prepared data; a stream does not hold them)."""
    labels = ds.train_labels()
    return None if labels is None else torch.from_numpy(np.asarray(labels)).long()


def _build_distiller(cfg: Config, paths: Paths, method: str, ds: Any, num_classes: int,
                     image_shape: tuple[int, ...], device: torch.device,
                     provenance: dict[str, Any]) -> Any:
    """The method's distiller around a fresh student (and the teacher it needs)."""
    s, spec = cfg.student, get(method)
    teacher = None
    if spec.needs_teacher:
        teacher, _ = load_model_file(paths.teacher_model, "teacher model")
        teacher = to_device(teacher, device, cfg.runtime.channels_last)
        maybe_compile(teacher, cfg.runtime.compile)
        provenance["teacher_sha256"] = file_sha256(paths.teacher_model)
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        # the student's and the predictor's initial weights depend on the seed alone
        torch.manual_seed(s.train.seed)
        student = to_device(build_model(s.arch, num_classes), device, cfg.runtime.channels_last)
        extra = (_codebook_context(cfg, paths, student, image_shape, device, provenance)
                 if spec.needs_codebook else {})
        # the method's extra heads (QuEST's predictor) are built here, under the same seed
        distiller = spec.build(MethodContext(
            student, teacher, resolve_settings(s), image_shape=image_shape,
            train_labels=_train_labels(ds), num_classes=num_classes, **extra))
    maybe_compile(student, cfg.runtime.compile)
    return distiller


def _val_metrics(cfg: Config, distiller: Any, ds: Any, device: torch.device) -> dict[str, Any]:
    """The trained student's validation top-1/top-5 (what choices read), or {} without a
    validation split. The test numbers stay the last epoch's, as before."""
    loader = val_loader(ds, cfg, device)
    if loader is None:
        return {}
    ev = evaluate(distiller, loader, len(ds.classes), device)
    return {"val_top1": ev["top1"], "val_top5": ev["top5"], "val_images": ev["num_images"]}


def _write_outputs(cfg: Config, paths: Paths, method: str, distiller: Any, ds: Any,
                   history: list[dict[str, Any]], provenance: dict[str, Any],
                   val: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The exported student, its metrics JSON and its per-epoch CSV; returns the metrics."""
    s = cfg.student
    mean, std = norm_stats(ds)
    final = history[-1]
    # the predictor trains alongside but is not exported: the saved student is the plain net
    save_model_file(paths.student_model(method), distiller.export_student(), arch=s.arch,
                    num_classes=len(ds.classes), classes=list(ds.classes), mean=mean, std=std,
                    method=method, **provenance)
    metrics = {
        "method": method,
        "arch": s.arch,
        "params": count_parameters(distiller.export_student()),
        "epochs": s.train.epochs,
        "top1": final["test_accuracy"],
        "top5": final["test_top5"],
        **val,
        "train_accuracy": final["train_accuracy"],
        "seconds": round(sum(r["seconds"] for r in history), 1),
        **provenance,
        **corrupt_metrics(ds),
        # every setting, the code and the machine, as the run record holds them
        **run_provenance(cfg, device),
        "history": history,
    }
    write_json_atomic(paths.student_metrics(method), metrics)
    write_csv_atomic(paths.student_curve(method), history)
    return metrics


def run_student(cfg: Config, paths: Paths, method: str, *, setting: str | None = None,
                study: str | None = None) -> dict[str, Any]:
    """Train the configured student with `method`; write model, metrics and per-epoch curves,
    and record the run in ``paths.results`` (labelled with its study and setting, if any)."""
    s = cfg.student
    started = time.monotonic()
    device = resolve_device(cfg)
    dist_info = distributed.env_info()  # set when launched by torchrun
    if dist_info is not None:
        device = distributed.init(dist_info, device)
    ds = load_data(paths)
    image_shape = ds.image_shape
    provenance: dict[str, Any] = {"data_sha256": data_hash(paths.prepared)}
    distiller = _build_distiller(cfg, paths, method, ds, len(ds.classes), image_shape, device,
                                 provenance)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    # a stream reads only this rank's share; prepared arrays are sliced per batch instead
    train_loader, test_loader = make_loaders(ds, cfg, s.train, device, rank, world)
    fingerprint = config_hash({"method": method, "student": config_hash(s), **provenance})
    step: Any = distiller.step
    if dist_info is not None:
        step, train_loader = distributed.data_parallel(
            distiller, device, train_loader, dist_info, s.train.batch_size,
            presharded=ds.streamed)
    trainer = Trainer(distiller, s.train, checkpoint_path=paths.checkpoint(f"student-{method}"),
                      fingerprint=fingerprint, device=device, num_classes=len(ds.classes),
                      progress=cfg.runtime.progress, desc=f"student[{method}]",
                      step=autocast_step(step, cfg.runtime.amp, device),
                      is_main=dist_info is None or dist_info.is_main,
                      graceful_stop=dist_info is None)
    log.info("student[%s] on %s: %s%s", method, device, describe(cfg.runtime, device),
             f", rank {dist_info.rank} of {dist_info.world_size}" if dist_info else "")
    history = trainer.fit(train_loader, test_loader)
    if dist_info is not None and not dist_info.is_main:
        return {"method": method, "rank": dist_info.rank}  # rank 0 writes the outputs
    val = _val_metrics(cfg, distiller, ds, device)
    metrics = _write_outputs(cfg, paths, method, distiller, ds, history, provenance, val,
                             device)
    trainer.finish()
    record = build_record(cfg, metrics, device=device,
                          teacher_arch=cfg.teacher.arch, wall_seconds=time.monotonic() - started,
                          setting=setting, study=study)
    write_record(paths.results, record)
    log.info("student[%s] %s: top-1 %.4f%s after %d epochs", method, s.arch, metrics["top1"],
             f", val top-1 {metrics['val_top1']:.4f}" if "val_top1" in metrics else "",
             s.train.epochs)
    return {k: v for k, v in metrics.items() if k != "history"}
