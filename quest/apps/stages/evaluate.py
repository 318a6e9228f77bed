"""Evaluate stage: top-1/top-5, parameters and MACs of the teacher and every trained student."""

from __future__ import annotations

from typing import Any

from quest.apps.stages.common import (
    eval_loader,
    load_data,
    resolve_device,
    split_size,
    to_device,
)
from quest.apps.stages.splits import evaluate_splits
from quest.core.checkpoint import load_model_file
from quest.core.models.zoo import count_macs, count_parameters
from quest.infra.config import Config
from quest.infra.io_utils import write_json_atomic
from quest.infra.paths import Paths, method_slug
from quest.infra.progress import log


def run_evaluate(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Write metrics/evaluation.json (test top-1/top-5 and, with a validation split,
    val_top1/val_top5 per model) and metrics/per_class.json (test split)."""
    device = resolve_device(cfg)
    ds = load_data(paths)
    image_shape = ds.image_shape
    loader = eval_loader(ds, cfg, device)
    models = {"teacher": paths.teacher_model}
    models.update({method_slug(m): paths.student_model(m) for m in cfg.student.methods})
    results: dict[str, Any] = {}
    per_class: dict[str, Any] = {"classes": list(ds.classes)}
    for name, path in models.items():
        model, meta = load_model_file(path, f"{name} model")
        model = to_device(model, device, cfg.runtime.channels_last)
        ev = evaluate_splits(model, ds, cfg, device, loader)
        results[name] = {
            "arch": meta["arch"],
            "top1": round(ev["top1"], 6),
            "top5": round(ev["top5"], 6),
            **{k: round(ev[k], 6) for k in ("val_top1", "val_top5") if k in ev},
            "params": count_parameters(model),
            "macs": count_macs(model.cpu(), image_shape),
        }
        per_class[name] = [round(v, 6) for v in ev["per_class"]]
        log.info("evaluate %s (%s): top-1 %.4f top-5 %.4f", name, meta["arch"], ev["top1"],
                 ev["top5"])
    out = {"num_test_images": split_size(ds, "test"), "num_val_images": split_size(ds, "val"),
           "models": results}
    write_json_atomic(paths.metrics / "evaluation.json", out)
    write_json_atomic(paths.metrics / "per_class.json", per_class)
    return out


def format_table(evaluation: dict[str, Any]) -> str:
    """A plain-text table of test top-1/top-5, validation top-1, parameters and MACs per model
    (choices read the validation column; the test columns are reported only)."""
    lines = [f"{'model':<10} {'arch':<10} {'val top-1':>9} {'top-1':>7} {'top-5':>7} "
             f"{'params':>10} {'MMACs':>8}"]
    for name, r in evaluation["models"].items():
        val = f"{100 * r['val_top1']:>8.2f}%" if "val_top1" in r else f"{'–':>9}"
        lines.append(
            f"{name:<10} {r['arch']:<10} {val} {100 * r['top1']:>6.2f}% {100 * r['top5']:>6.2f}% "
            f"{r['params']:>10,} {r['macs'] / 1e6:>8.1f}"
        )
    return "\n".join(lines)
