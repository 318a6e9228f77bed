"""results/: provenance records of finished runs, the seed sweep, and the README table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quest.apps.cli import main
from quest.apps.provenance import code_fingerprint
from quest.apps.results import load_records, params_hash, results_table
from quest.infra.config import Config, config_hash, load_config

REPO = Path(__file__).resolve().parent.parent


def _record(method: str, seed: int, top1: float, *, params: str = "p1", when: str = "a") -> dict:
    return {"finished_at": when, "method": method, "teacher": "resnet56", "student": "resnet20",
            "seed": seed, "group": "g", "params_hash": params, "wall_seconds": 60.0,
            "top1": top1, "top5": 0.9}


def test_table_means_and_sample_std_over_seeds() -> None:
    rows = results_table([_record("kd", 0, 0.60), _record("kd", 1, 0.62), _record("kd", 2, 0.64),
                          _record("ce", 0, 0.5)]).splitlines()
    assert len(rows) == 4
    # ce sorts before kd; the std is the sample std (n-1): 2.00 for 60/62/64
    assert "| ce | 0 | no val | 50.00 ± 0.00 |" in rows[2]
    assert "| kd | 0,1,2 | no val | 62.00 ± 2.00 | 90.00 ± 0.00 |" in rows[3]


def test_table_keeps_the_newest_run_of_a_seed_and_splits_settings() -> None:
    recs = [_record("ce", 0, 0.1, when="1"), _record("ce", 0, 0.3, when="2"),
            _record("ce", 0, 0.7, params="p2")]
    rows = results_table(recs).splitlines()[2:]
    assert len(rows) == 2
    assert sorted(r.split("|")[6].strip() for r in rows) == ["30.00 ± 0.00", "70.00 ± 0.00"]


def test_params_hash_covers_what_each_method_reads() -> None:
    cfg = load_config(REPO / "params.yaml")
    other = load_config(REPO / "params.yaml", overrides=["student.quest.weight=7",
                                                         "data.location=/elsewhere/" +
                                                         Path(cfg.data.location).name])
    # CE and KD do not read the QuEST settings, and an input's directory is not a setting
    assert params_hash(cfg, "ce") == params_hash(other, "ce")
    assert params_hash(cfg, "kd") == params_hash(other, "kd")
    assert params_hash(cfg, "quest") != params_hash(other, "quest")
    kd_t = load_config(REPO / "params.yaml", overrides=["student.kd.temperature=8"])
    assert params_hash(cfg, "kd") != params_hash(kd_t, "kd")
    assert params_hash(cfg, "ce") == params_hash(kd_t, "ce")
    seed = load_config(REPO / "params.yaml", overrides=["student.train.seed=5"])
    assert params_hash(cfg, "quest+kd") == params_hash(seed, "quest+kd")
    # a setting added later stays out of the hash at its neutral value (older records match)
    rep = load_config(REPO / "params.yaml", overrides=["student.train.repeat=1"])
    assert params_hash(cfg, "ce") == params_hash(rep, "ce")
    rep = load_config(REPO / "params.yaml", overrides=["student.train.repeat=4"])
    assert params_hash(cfg, "ce") != params_hash(rep, "ce")
    # the QuEST tap is read by the methods with feature taps only (a CE run pairs with it)
    tap = load_config(REPO / "params.yaml", overrides=["student.layer=layer2",
                                                       "features.layer=layer2"])
    for method in ("ce", "kd", "fitnet", "at"):
        assert params_hash(cfg, method) == params_hash(tap, method), method
    assert params_hash(cfg, "quest") != params_hash(tap, "quest")


@pytest.mark.slow
def test_student_run_is_recorded_and_sweep_skips_recorded_seeds(smoke_root: Path) -> None:
    base = ["--root", str(smoke_root), "--preset", "smoke", "--set", "student.train.epochs=1"]
    assert main(["teacher", *base]) == 0
    assert main(["student", "--method", "ce", *base]) == 0
    (rec,) = load_records(smoke_root / "results" / "runs")
    assert rec["method"] == "ce" and rec["seed"] == 0 and rec["student"] == "resnet20"
    assert rec["teacher"] == "resnet56" and len(rec["data_sha256"]) == 64
    assert 0.0 <= rec["top1"] <= rec["top5"] <= 1.0 and rec["wall_seconds"] > 0
    assert rec["device"].startswith("cpu")
    metrics = json.loads((smoke_root / "metrics" / "students" / "ce.json").read_text())
    assert rec["top1"] == metrics["top1"]
    # every setting of every section (those the settings hash leaves out too), the training
    # code's fingerprint, the processor and the thread count, in the record and the metrics
    assert set(rec["config"]) == set(Config.model_fields)
    full = rec["config"]
    assert full["features"]["pool"] == 1 and full["data"]["padding_mode"] == "constant"
    assert full["data"]["format"] == "prepared" and full["student"]["train"]["repeat"] == 1
    assert full["student"]["quest"]["extra_levels"] == {} and "threads" in full["runtime"]
    assert full["data"]["location"] == "cifar10-jpeg.tar.gz"  # by name, as in the hash
    assert rec["code_fingerprint"] == code_fingerprint() and len(rec["code_fingerprint"]) == 16
    assert rec["machine"]["cpu"] and rec["machine"]["torch_threads"] >= 1
    assert rec["schema"] == 3 and rec["config_hash"] == config_hash(full)
    assert {k: metrics[k] for k in ("config", "code_fingerprint")} == {
        k: rec[k] for k in ("config", "code_fingerprint")}
    # the smoke preset's validation split (5 per class): measured and recorded beside test
    assert rec["val_images"] == metrics["val_images"] == 50
    assert 0.0 <= rec["val_top1"] == metrics["val_top1"] <= rec["val_top5"] <= 1.0

    assert main(["sweep", "--seeds", "0", "1", "--method", "ce", *base]) == 0
    recs = load_records(smoke_root / "results" / "runs")
    assert sorted(r["seed"] for r in recs) == [0, 1]  # seed 0 was already there: not retrained
    assert len({r["params_hash"] for r in recs}) == 1  # the seed is not part of the hash
    # the project's own student is untouched: seed 1 trained in its scratch root
    assert json.loads((smoke_root / "metrics" / "students" / "ce.json").read_text()) == metrics
    assert main(["sweep", "--seeds", "0", "1", "--method", "ce", *base]) == 0
    assert len(load_records(smoke_root / "results" / "runs")) == 2


def test_sweep_without_upstream_outputs_says_what_to_run(smoke_root: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["sweep", "--root", str(smoke_root), "--preset", "smoke", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `quest run`" in err[0] and "teacher.pt" in err[0]
