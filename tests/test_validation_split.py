"""The validation split: drawn apart from train and test, carried into records, tables and the
registry, and the only split any choice reads (best-of rows, the challenger, the champion)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quest.core.data.prepared import (
    VAL_FILES,
    PreparedDataset,
    Split,
    arrays_sha256,
    load_prepared,
    save_prepared,
)
from quest.core.data.sources import _Plan, _subset_plan, smoke_subset
from quest.infra.config import load_config
from quest.infra.errors import QuestError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def _split(first: int, per_class: int, rng: np.random.Generator) -> Split:
    """Random 3 x 8 x 8 images, each made unique by its id in the first pixels."""
    n = per_class * len(CLASSES)
    images = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
    ids = np.arange(first, first + n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
    return Split(images, np.repeat(np.arange(len(CLASSES)), per_class))


def _pool(per_class: int = 20) -> PreparedDataset:
    rng = np.random.default_rng(0)
    return PreparedDataset(_split(0, per_class, rng), _split(1000, 5, rng), list(CLASSES),
                           {"mean": [0.5] * 3, "std": [0.25] * 3})


def _ids(split: Split) -> set[int]:
    pixels = split.images[:, 0, 0, :2].astype(np.int64)
    return set((pixels[:, 0] + 256 * pixels[:, 1]).tolist())


def test_validation_is_drawn_outside_the_training_subset_and_leaves_it_unchanged() -> None:
    ds = _pool()
    plain = smoke_subset(ds, 5, None, seed=1)
    held = smoke_subset(ds, 5, None, seed=1, validation=(4, 7))
    assert held.val is not None and plain.val is None
    # the training subset is the one drawn without a validation split (records stay comparable)
    assert np.array_equal(plain.train.images, held.train.images)
    assert not _ids(held.val) & _ids(held.train) and not _ids(held.val) & _ids(held.test)
    assert np.bincount(held.val.labels).tolist() == [4, 4, 4]
    assert held.meta["counts"] == {"train": 15, "test": 15, "val": 12}
    assert held.meta["validation"]["drawn_from"].startswith("the training pool outside")
    # its own seed: the same seed draws the same images, another seed others
    again = smoke_subset(ds, 5, None, seed=1, validation=(4, 7))
    other = smoke_subset(ds, 5, None, seed=1, validation=(4, 8))
    assert _ids(again.val) == _ids(held.val) != _ids(other.val)  # type: ignore[arg-type]
    with pytest.raises(QuestError, match="fewer than data.validation_per_class 16"):
        smoke_subset(ds, 5, None, seed=1, validation=(16, 0))


def test_validation_is_carved_out_of_a_whole_training_pool() -> None:
    ds = _pool()
    carved = smoke_subset(ds, None, None, seed=0, validation=(4, 0))
    assert carved.val is not None
    assert len(carved.train) == 48 and len(carved.val) == 12
    assert _ids(carved.train) | _ids(carved.val) == _ids(ds.train)
    assert not _ids(carved.train) & _ids(carved.val)
    assert carved.meta["validation"]["drawn_from"].startswith("carved out of the whole")
    with pytest.raises(QuestError, match="leaves none to train on"):
        smoke_subset(ds, None, None, seed=0, validation=(20, 0))


def test_image_folder_plan_holds_validation_files_out_of_train() -> None:
    files = {"train": [(f"train/{c}/{i}.png", k) for k, c in enumerate(CLASSES)
                       for i in range(12)],
             "test": [(f"test/{c}/{i}.png", k) for k, c in enumerate(CLASSES) for i in range(3)]}
    plan = _Plan(list(CLASSES), files, [])
    plain = _subset_plan(plan, (4, None, 0))
    held = _subset_plan(plan, (4, None, 0), (3, 0))
    assert held.files["train"] == plain.files["train"] and "val" not in plain.files
    val = {n for n, _ in held.files["val"]}
    assert len(val) == 9 and not val & {n for n, _ in held.files["train"]}
    assert all(n.startswith("train/") for n in val)
    whole = _subset_plan(plan, None, (3, 0))
    assert len(whole.files["train"]) == 27 and whole.files["test"] == files["test"]


def test_prepared_format_keeps_the_validation_split(tmp_path: Path) -> None:
    ds = _pool()
    digest = save_prepared(ds, tmp_path)
    assert not any((tmp_path / f).exists() for f in VAL_FILES)
    held = smoke_subset(ds, 5, None, seed=0, validation=(4, 0))
    with_val = save_prepared(held, tmp_path)
    back = load_prepared(tmp_path, verify=True)
    assert back.val is not None and np.array_equal(back.val.images, held.val.images)
    assert with_val == arrays_sha256(held) != arrays_sha256(
        PreparedDataset(held.train, held.test, held.classes))
    # a dataset without a validation split keeps the hash it had before the split existed,
    # and re-preparing without one removes the old split's files
    assert save_prepared(ds, tmp_path) == digest
    assert not any((tmp_path / f).exists() for f in VAL_FILES)
    assert load_prepared(tmp_path).val is None


def test_records_carry_val_and_keep_the_hash_when_training_is_unchanged() -> None:
    import torch

    from quest.apps.results import build_record, params_hash, results_table

    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.validation_per_class == 100 and cfg.data.subset.train_per_class == 1000
    no_val = load_config(REPO / "params.yaml", overrides=["data.validation_per_class=0"])
    # drawn outside the training subset, the split changes nothing the run computes
    assert params_hash(cfg, "quest") == params_hash(no_val, "quest")
    whole = ["data.subset.train_per_class=null"]
    carved = load_config(REPO / "params.yaml", overrides=whole)
    assert params_hash(carved, "ce") != params_hash(load_config(
        REPO / "params.yaml", overrides=[*whole, "data.validation_per_class=0"]), "ce")
    with pytest.raises(QuestError, match="data.validation_per_class is -1: use a value greater "
                                         "than or equal to 0"):
        load_config(REPO / "params.yaml", overrides=["data.validation_per_class=-1"])
    metrics = {"method": "kd", "top1": 0.6, "top5": 0.9, "val_top1": 0.62, "val_top5": 0.93,
               "val_images": 1000}
    rec = build_record(cfg, metrics, device=torch.device("cpu"), teacher_arch="resnet56",
                       wall_seconds=1.0)
    assert (rec["val_top1"], rec["val_top5"], rec["val_images"]) == (0.62, 0.93, 1000)
    old = {**rec, "seed": 1}
    for key in ("val_top1", "val_top5", "val_images"):
        old.pop(key)  # a record made before the split
    table = results_table([rec, old]).splitlines()
    assert "val top-1 %" in table[0]
    assert "62.00 ± 0.00 (1 with val)" in table[2]
    assert "no val" in results_table([old])


def test_official_presets_keep_their_whole_training_set() -> None:
    from quest.infra.config import read_preset_files

    for name in ("cifar10-full", "cifar100"):
        assert load_config(REPO / "params.yaml", name).data.validation_per_class == 0
    for name in read_preset_files(REPO / "presets"):
        assert load_config(REPO / "params.yaml", name).data.validation_per_class == 0, name
    for name in ("smoke", "tiny"):
        assert load_config(REPO / "params.yaml", name).data.validation_per_class > 0


STUDY = """\
methods: [ce, kd, quest]
seeds: [0, 1]
settings:
  - name: w1
    set: {student.quest.weight: 1.0}
  - name: w3
    set: {student.quest.weight: 3.0}
    methods: [quest]
"""


def test_best_of_rows_choose_on_validation_only(tmp_path: Path) -> None:
    """w1's QuEST leads on test, w3's on validation: the best-of row takes w3; KD has no run
    with val (recorded before the split), so its row says so instead of choosing on test."""
    from quest.apps.study.spec import load_study, planned_runs
    from quest.apps.study.table import render

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "v.yaml").write_text(STUDY)
    out = tmp_path / "results" / "v"
    out.mkdir(parents=True)
    study = load_study(tmp_path / "studies" / "v.yaml", tmp_path)
    scores = {("w1", "quest"): (0.80, 0.50), ("w3", "quest"): (0.70, 0.60),
              ("w1", "ce"): (0.55, 0.52), ("w1", "kd"): (0.65, None)}
    for i, (setting, method, seed, _, h) in enumerate(planned_runs(study, tmp_path)):
        test, val = scores[(setting.name, method)]
        rec: dict[str, Any] = {"finished_at": f"t{i:02d}", "method": method, "seed": seed,
                               "params_hash": h, "setting": setting.name, "top1": test,
                               "top5": 0.9, "history": []}
        if val is not None:
            rec.update(val_top1=val + 0.01 * seed, val_top5=0.95)
        (out / f"{i:02d}.json").write_text(json.dumps(rec))
    text = render(study, tmp_path)
    rows: dict[tuple[str, ...], str] = {}
    for line in text.splitlines():  # the runs table comes first (then the QuEST diagnostics)
        if line.startswith("| w"):
            rows.setdefault(tuple(c.strip() for c in line.split("|")[1:3]), line)
    assert "| no val |" in rows[("w1", "kd")] and "50.50 ± 0.71" in rows[("w1", "quest")]
    best = text[text.index("| schedule | method | best setting (on val) |"):].splitlines()
    best = best[2:best.index("")]
    cells = {r.split("|")[2].strip(): [c.strip() for c in r.split("|")[3:-1]] for r in best}
    assert cells["quest"][0] == "w3" and cells["quest"][3] == "70.00 ± 0.00"
    assert cells["kd"][0] == "no run with val"
    assert cells["ce"][0] == "w1"


def test_registry_picks_and_promotes_the_val_better_student(tmp_path: Path) -> None:
    """A real SQLite registry where validation and test disagree: the student better on
    validation becomes challenger and champion; one better on test only is refused."""
    import mlflow

    from quest.apps.tracking import promote
    from quest.apps.tracking.mlflow_log import _set_challenger
    from quest.apps.tracking.registry import STUDENT_MODEL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(STUDENT_MODEL)
    source = (tmp_path / "model").as_uri()

    def version(test: float, val: float | None) -> int:
        tags = {"test_top1": str(test)} | ({"val_top1": str(val)} if val is not None else {})
        return int(client.create_model_version(STUDENT_MODEL, source, tags=tags).version)

    versions = {"kd": version(0.90, 0.60), "quest": version(0.70, 0.75)}
    picked = _set_challenger(client, ["kd", "quest"], versions)
    assert picked["challenger"] == {"method": "quest", "version": versions["quest"],
                                    "val_top1": 0.75}
    first = promote(uri, min_top1=0.5)
    assert first["promoted"] and first["version"] == versions["quest"]
    assert first["val_top1"] == 0.75 and "val_top1" in first["reason"]
    # higher test accuracy, lower validation accuracy: not promoted
    test_only = version(0.99, 0.70)
    refused = promote(uri, version=test_only)
    assert not refused["promoted"] and "does not beat" in refused["reason"]
    champion = client.get_model_version_by_alias(STUDENT_MODEL, "champion")
    assert int(champion.version) == versions["quest"]
    # the gate reads validation: min_top1 against val_top1
    better = version(0.10, 0.80)
    assert "below min_top1" in promote(uri, min_top1=0.85, version=better)["reason"]
    assert promote(uri, min_top1=0.5, version=better)["promoted"]
    # a student without validation accuracy can be neither picked nor promoted
    none = _set_challenger(client, ["ce"], {"ce": version(0.95, None)})
    assert none["challenger"] is None and "no challenger" in none["challenger_note"]
    with pytest.raises(QuestError, match="no numeric val_top1 tag"):
        promote(uri, version=version(0.95, None))


@pytest.mark.parametrize("leak", [None, "test", "train"])
def test_data_gate_checks_validation_is_disjoint(tmp_path: Path, leak: str | None) -> None:
    from quest.apps.validation import run_validation
    from quest.infra.paths import Paths

    held = smoke_subset(_pool(), 10, None, seed=0, validation=(5, 0))
    assert held.val is not None
    if leak is not None:  # one validation image is a copy of a test or training image
        held.val.images[0] = getattr(held, leak).images[3]
    save_prepared(held, tmp_path / "data" / "prepared")
    cfg = load_config(REPO / "params.yaml", "tiny")
    paths = Paths(tmp_path)
    if leak is None:
        report = run_validation("data", cfg, paths)
        assert report["observed"]["duplicates_val_in_train"] == 0
        assert report["observed"]["duplicates_val_in_test"] == 0
        assert report["observed"]["images"]["val"] == 15
        assert report["observed"]["validation"]["per_class"] == 5
        return
    with pytest.raises(QuestError, match=f"validation images .* duplicates of {leak} images"):
        run_validation("data", cfg, paths)
