"""Provenance: the code fingerprint, the processor read back from records, the table marks for
differences that span processors or code, staleness, and a run retrained from its record."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from quest.apps import provenance
from quest.apps.cli import main
from quest.apps.provenance import (
    PACKAGE,
    code_fingerprint,
    cpu_key,
    fingerprint_of,
    fingerprint_of_files,
    spans,
)
from quest.apps.rerun import record_config, record_raw_config
from quest.apps.results import load_records, method_settings, params_hash
from quest.infra.config import load_config
from quest.infra.errors import QuestError

REPO = Path(__file__).resolve().parent.parent


def test_fingerprint_is_content_only_and_covers_the_training_code(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "quest", tmp_path / "b" / "quest"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(PACKAGE, a, ignore=ignore)
    shutil.copytree(PACKAGE, b, ignore=ignore)
    engine = b / "core" / "engine.py"
    os.utime(engine, (1, 1))  # another checkout: other mtimes, same contents
    assert fingerprint_of_files(a) == fingerprint_of_files(b) == code_fingerprint()
    engine.write_bytes(engine.read_bytes().replace(b"\n", b"\r\n"))  # a Windows checkout
    assert fingerprint_of_files(b) == code_fingerprint()
    (b / "apps" / "cli.py").write_text("# orchestration only\n")  # not training code
    (b / "apps" / "study_table.py").write_text("# tables only\n")
    assert fingerprint_of_files(b) == code_fingerprint()
    engine.write_text(engine.read_text() + "\n# a changed training step\n")
    assert fingerprint_of_files(b) != code_fingerprint()
    (a / "apps" / "stages" / "features.py").write_text("# another extraction\n")
    assert fingerprint_of_files(a) != code_fingerprint()


def test_processor_and_code_read_back_from_old_and_new_records() -> None:
    old_amd = {"device": "cpu: AMD EPYC x2"}
    old_intel = {"device": "cpu: Intel(R) Xeon(R) Processor x2"}
    milan = {"machine": {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 1"},
             "code_fingerprint": "a" * 16}
    genoa = {"machine": {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 17"},
             "code_fingerprint": "a" * 16}
    gpu = {"device": "NVIDIA H100", "machine": {"cpu": "x", "gpu": "NVIDIA H100"}}
    assert cpu_key(old_amd) == "AMD EPYC" and cpu_key(gpu) == "NVIDIA H100"
    assert cpu_key({}) == "unknown" and fingerprint_of(old_amd) == "unknown"
    assert spans([old_amd, old_amd]) == ["code?"]
    assert spans([old_amd, old_intel]) == ["cpu", "code?"]
    # one name, two microarchitectures: the family/model numbers tell them apart
    assert spans([milan, genoa]) == ["cpu"]
    assert spans([milan, milan]) == [] and spans([milan, old_amd]) == ["code?"]
    assert spans([milan, {**milan, "code_fingerprint": "b" * 16}]) == ["code"]


def test_code_shown_equivalent_compares_as_one_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """EQUIVALENT_CODE (a refactor shown to train the same bits) joins two fingerprints, chains
    included; every equivalence the project declares has its evidence file, which says so."""
    milan = {"machine": {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 1"},
             "code_fingerprint": "a" * 16}
    b, c = {**milan, "code_fingerprint": "b" * 16}, {**milan, "code_fingerprint": "c" * 16}
    assert spans([milan, b]) == ["code"]
    monkeypatch.setattr(provenance, "EQUIVALENT_CODE", {"b" * 16: "a" * 16, "c" * 16: "b" * 16})
    assert provenance.code_version("c" * 16) == "a" * 16
    assert spans([milan, b, c]) == [] and spans([milan, {**milan, "code_fingerprint": "d" * 16}
                                                 ]) == ["code"]
    monkeypatch.undo()
    evidence = Path(__file__).resolve().parents[1] / "results" / "code-equivalence"
    for new, old in provenance.EQUIVALENT_CODE.items():
        report = json.loads((evidence / f"{new}-{old}.json").read_text())
        assert report["identical"] is True and (report["old"], report["new"]) == (old, new)
        assert len(report["students"]) >= 9 and all(report["students"].values())


def test_an_old_record_rebuilds_its_config_with_the_same_settings_hash(
        cifar_archive: Path, teacher_checkpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema-2 record holds only the settings its method reads: rebuilt over today's
    defaults they give the same settings hash; inputs are found by file name."""
    monkeypatch.setenv("QUEST_DATA_LOCATION", str(cifar_archive))
    monkeypatch.setenv("QUEST_TEACHER_CHECKPOINT", str(teacher_checkpoint))
    cfg = load_config(REPO / "params.yaml", overrides=[
        "student.quest.weight=3", "codebook.k=512", "student.train.seed=2",
        "data.padding_mode=reflect", "features.pool=2"])
    for method in ("ce", "kd", "quest"):
        old = {"method": method, "seed": 2, "params_hash": params_hash(cfg, method),
               "settings": method_settings(cfg, method)}
        raw = record_raw_config(old)
        assert raw["student"]["train"]["seed"] == 2
        again = record_config(old, tmp_path)
        assert params_hash(again, method) == old["params_hash"]
        assert again.data.location == str(cifar_archive)
    assert again.student.quest.weight == 3 and again.features.pool == 2
    with pytest.raises(QuestError, match="hash"):
        record_config({**old, "params_hash": "0" * 16}, tmp_path)
    monkeypatch.setenv("QUEST_DATA_LOCATION", str(tmp_path / "other.tar.gz"))
    with pytest.raises(QuestError, match="cifar10-jpeg.tar.gz"):
        record_config(old, tmp_path)


def _write_study(root: Path) -> None:
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "studies").mkdir()
    (root / "studies" / "marks.yaml").write_text(
        "methods: [ce, quest]\nseeds: [0, 1]\nsettings:\n  - name: a\n")


def test_table_marks_deltas_across_processors_and_code_and_reports_staleness(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from quest.apps.study.spec import load_study, planned_runs
    from quest.apps.study.table import render, staleness

    _write_study(tmp_path)
    study = load_study(tmp_path / "studies" / "marks.yaml", tmp_path)
    out = tmp_path / "results" / "marks"
    out.mkdir(parents=True)
    today = code_fingerprint()
    # seed 0: CE on Intel, QuEST on AMD; seed 1: both on AMD with today's code
    where = {(0, "ce"): ("cpu: Intel(R) Xeon(R) x2", None),
             (0, "quest"): ("cpu: AMD EPYC x2", None),
             (1, "ce"): ("cpu: AMD EPYC x2", today), (1, "quest"): ("cpu: AMD EPYC x2", "f" * 16)}
    for i, (setting, method, seed, _, h) in enumerate(planned_runs(study, tmp_path)):
        device, fp = where[(seed, method)]
        rec = {"finished_at": f"t{i}", "method": method, "seed": seed, "params_hash": h,
               "setting": setting.name, "top1": 0.5 + 0.1 * (method == "quest"), "top5": 0.9,
               "device": device, "history": []}
        if fp:
            rec["code_fingerprint"] = fp
        (out / f"{i}.json").write_text(json.dumps(rec))
    row = next(line for line in render(study, tmp_path).splitlines()
               if line.startswith("| a | quest |"))
    assert "+10.00 ± 0.00 (n=2) [cpu, code]" in row  # two known prints differ
    text = staleness(study, tmp_path)
    assert "1 stale, 1 current, 2 unknown" in text
    lines = {tuple(c.strip() for c in line.split("|")[3:5]): line for line in text.splitlines()
             if "| a |" in line}
    assert lines[("quest", "1")].startswith("| stale |")
    assert lines[("ce", "1")].startswith("| current |")
    assert lines[("ce", "0")].startswith("| unknown |") and "Intel" in lines[("ce", "0")]
    # --reproduce prints it before anything trains
    capsys.readouterr()
    assert main(["study", str(tmp_path / "studies" / "marks.yaml"), "--root", str(tmp_path),
                 "--reproduce", "--dry-run"]) == 0
    assert "1 stale, 1 current, 2 unknown" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_is_retrained_from_its_record_alone(smoke_root: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (smoke_root / "studies").mkdir()
    (smoke_root / "studies" / "one.yaml").write_text(
        "preset: tiny\nmethods: [quest]\nseeds: [1]\nsettings:\n  - name: w3\n"
        "    set: {student.quest.weight: 3.0, features.pool: 2, codebook.k: 16}\n")
    assert main(["study", str(smoke_root / "studies" / "one.yaml"), "--root",
                 str(smoke_root)]) == 0
    (path,) = (smoke_root / "results" / "one").glob("*.json")
    record = json.loads(path.read_text())
    # the record alone: no study file, and params.yaml says something else everywhere
    shutil.rmtree(smoke_root / "studies")
    params = (smoke_root / "params.yaml").read_text()
    (smoke_root / "params.yaml").write_text(params.replace("k: 256", "k: 64"))
    capsys.readouterr()
    assert main(["study", "--rerun-record", str(path), "--root", str(smoke_root)]) == 0
    said = capsys.readouterr().out
    (again,) = load_records(smoke_root / "results" / "runs" / "rerun")
    assert again["params_hash"] == record["params_hash"] and again["config"] == record["config"]
    assert again["config"]["features"]["pool"] == 2 and again["seed"] == 1
    # same machine, same code, same thread count: the same codebook and the same numbers
    assert again["codebook_sha256"] == record["codebook_sha256"]
    assert again["top1"] == record["top1"]
    assert "Δ +0.00" in said and "settings hash" in said and "(same)" in said
    assert len(load_records(smoke_root / "results" / "one")) == 1  # the record is untouched
