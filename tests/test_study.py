"""Studies: the resumable runner, its tables (paired statistics), and the committed evidence."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from quest.apps.cli import main
from quest.apps.results import load_records
from quest.apps.study.spec import Study
from quest.apps.study.table import markers, mean_std, paired_diff, t975
from quest.infra.config import Config

REPO = Path(__file__).resolve().parent.parent

TINY_STUDY = """
name: tiny
description: two settings sharing their CE runs
preset: tiny
methods: [ce, quest]
seeds: [0, 1]
settings:
  - name: base
    set: {student.train.epochs: 1}
  - name: strong
    set: {student.train.epochs: 1, student.quest.weight: 10.0,
          student.quest.predictor: fixed_scale_bias, student.quest.init_scale: 10.0}
"""


def test_t_quantiles_match_scipy() -> None:
    for dof in (1, 2, 3, 5, 10, 29, 30):
        assert t975(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-3)


def test_paired_difference_and_interval_against_scipy() -> None:
    quest = {0: 71.30, 1: 72.04, 2: 70.57}
    kd = {0: 66.19, 1: 64.25, 2: 64.19, 3: 65.0}  # seed 3 has no pair: left out
    m, half, n = paired_diff(quest, kd)
    diffs = [quest[s] - kd[s] for s in (0, 1, 2)]
    res = stats.ttest_rel([quest[s] for s in (0, 1, 2)], [kd[s] for s in (0, 1, 2)])
    ci = res.confidence_interval(0.95)
    assert n == 3 and m == pytest.approx(sum(diffs) / 3)
    assert m - half == pytest.approx(ci.low, abs=2e-3) and m + half == pytest.approx(ci.high,
                                                                                     abs=2e-3)
    assert paired_diff({0: 1.0}, {0: 0.5}) == (0.5, None, 1)
    assert math.isnan(paired_diff({0: 1.0}, {1: 0.5})[0])
    assert mean_std([60.0, 62.0, 64.0]) == (62.0, 2.0)


@pytest.fixture
def study_root(smoke_root: Path) -> Path:
    (smoke_root / "studies").mkdir()
    (smoke_root / "studies" / "tiny.yaml").write_text(TINY_STUDY)
    (smoke_root / "README.md").write_text("# project\n")
    return smoke_root


def _study(root: Path, *args: str) -> int:
    return main(["study", str(root / "studies" / "tiny.yaml"), "--root", str(root), *args])


@pytest.mark.slow
def test_tiny_study_end_to_end_resumes_and_detects_stale_tables(
        study_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an interrupted study: only the first setting ran, seed 0 first, QuEST before CE
    assert _study(study_root, "--setting", "base", "--seed", "0", "--method", "quest") == 0
    assert [r["method"] for r in load_records(study_root / "results" / "tiny")] == ["quest"]
    assert _study(study_root, "--setting", "base", "--seed", "0") == 0
    assert len(load_records(study_root / "results" / "tiny")) == 2
    assert _study(study_root, "--setting", "base") == 0
    recs = load_records(study_root / "results" / "tiny")
    assert sorted((r["method"], r["seed"]) for r in recs) == [("ce", 0), ("ce", 1),
                                                             ("quest", 0), ("quest", 1)]
    assert {r["setting"] for r in recs} == {"base"} and {r["study"] for r in recs} == {"tiny"}
    # the rerun trains only what is missing: strong's CE runs are base's (same settings hash)
    capsys.readouterr()
    assert _study(study_root, "--dry-run") == 0
    todo = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[:3] for line in todo] == [["strong", "quest", "seed 0"],
                                                      ["strong", "quest", "seed 1"]]
    assert _study(study_root) == 0
    recs = load_records(study_root / "results" / "tiny")
    aliases = [r for r in recs if "alias_of" in r]
    recs = [r for r in recs if "alias_of" not in r]
    assert len(recs) == 6
    # strong's CE runs are base's, labelled for strong too (same numbers, not new runs)
    assert sorted((r["setting"], r["method"], r["seed"]) for r in aliases) == [
        ("strong", "ce", 0), ("strong", "ce", 1)]
    assert all(r["alias_of"]["setting"] == "base" for r in aliases)
    strong = [r for r in recs if r["setting"] == "strong"]
    assert {r["settings"]["quest"]["predictor"] for r in strong} == {"fixed_scale_bias"}
    # every QuEST record carries its per-epoch diagnostics
    for r in recs:
        if r["method"] == "quest":
            last = r["history"][-1]
            for key in ("word_accuracy", "mean_max_assignment", "student_mean_max",
                        "predictor_scale", "quest", "ce"):
                assert key in last, key
            expected_scale = 10.0 if r["setting"] == "strong" else None
            if expected_scale is not None:  # the fixed scale stays fixed
                assert last["predictor_scale"] == pytest.approx(expected_scale)
    readme = (study_root / "docs" / "evidence.md").read_text()
    start, end = markers("tiny")
    assert start in readme and end in readme
    table = readme[readme.index(start):readme.index(end)]
    assert "| strong | ce | 0,1 |" in table and "| strong | quest | 0,1 |" in table
    assert "Δ vs CE" in table and "(n=2)" in table and "student max" in table
    assert (study_root / "results" / "tiny" / "TABLE.md").is_file()
    assert _study(study_root, "--check") == 0
    # a third run trains nothing and labels nothing twice
    assert _study(study_root) == 0
    assert len(load_records(study_root / "results" / "tiny")) == 8
    # a reproduction (as on another machine) retrains seed 0 of base apart and compares
    capsys.readouterr()
    assert _study(study_root, "--reproduce", "--setting", "base", "--seed", "0") == 0
    again = study_root / "results" / "runs" / "reproduce-tiny"
    assert sorted(r["method"] for r in load_records(again)) == ["ce", "quest"]
    rows = [line for line in (again / "REPRODUCE.md").read_text().splitlines()
            if line.startswith("| base |")]
    assert len(rows) == 2 and all(" +0.00 " in row for row in rows)  # same machine, same code
    assert _study(study_root, "--check") == 0  # reproductions never enter the tables
    assert len(load_records(study_root / "results" / "tiny")) == 8
    # a record that changes makes the committed table stale, and --table-only regenerates it
    path = sorted((study_root / "results" / "tiny").glob("*-quest-*.json"))[0]
    rec = json.loads(path.read_text())
    rec["top1"] = 0.987
    path.write_text(json.dumps(rec))
    capsys.readouterr()
    assert _study(study_root, "--check") == 1
    assert "stale" in capsys.readouterr().err
    assert _study(study_root, "--table-only") == 0
    assert _study(study_root, "--check") == 0
    # everyday runs record apart, so they never make a study's table stale
    assert not list((study_root / "results" / "runs").glob("*.json"))


def test_bad_study_files_are_one_line_errors(study_root: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = {
        "settings: []\n": "non-empty list",
        "settings:\n  - name: a\n    set: {student.nope: 1}\n": "student",
        "settings:\n  - name: a\n    methods: [fitnetz]\n": "unknown method 'fitnetz'",
        "settings:\n  - name: a\n  - name: a\n": "unique",
        "setings: []\n": "unknown key(s) setings",
        "set: [1]\nsettings:\n  - name: a\n": "'set' must map dotted keys",
        "set: {codebook.kk: 8}\nsettings:\n  - name: a\n": "codebook",
    }
    for text, needle in bad.items():
        (study_root / "studies" / "tiny.yaml").write_text(text)
        assert _study(study_root) == 2, text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (text, err)
    assert main(["study", str(study_root / "studies" / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (study_root / "studies" / "tiny.yaml").write_text("settings:\n  - name: a\n")
    assert _study(study_root, "--method", "fitnet", "--dry-run") == 2
    assert "runs method 'fitnet'" in capsys.readouterr().err


def test_study_wide_set_is_under_every_settings_own(tmp_path: Path) -> None:
    """The study's `set:` frames every setting (a pinned K keeps its records when params.yaml's
    default changes); a setting's own override wins over it."""
    from quest.apps.study.spec import load_study, setting_config

    path = tmp_path / "frame.yaml"
    path.write_text("set: {codebook.k: 96, student.quest.weight: 2.0}\n"
                    "settings:\n  - name: a\n  - name: b\n    set: {codebook.k: 48}\n")
    study = load_study(path, REPO)
    a, b = (setting_config(study, s, REPO) for s in study.settings)
    assert (a.codebook.k, a.student.quest.weight) == (96, 2.0)
    assert (b.codebook.k, b.student.quest.weight) == (48, 2.0)


def _committed_studies() -> list[Path]:
    return sorted((REPO / "studies").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("study", _committed_studies(), ids=lambda p: p.stem)
def test_committed_study_tables_are_current(study: Path) -> None:
    """docs/evidence.md and results/<study>/TABLE.md match what the committed records give."""
    assert main(["study", str(study), "--root", str(REPO), "--check"]) == 0


@pytest.mark.slow
def test_make_run_then_the_table_checks_pass(tmp_path: Path, cifar_archive: Path,
                                             teacher_checkpoint: Path) -> None:
    """The README's two commands in the order a new user types them: `make run` (here on the
    tiny preset: the test checks where the records go, not what they hold) writes its records
    apart from the committed evidence, so the tables stay current for `make test`."""
    # the checkout as a fresh clone has it (plus files not yet committed, on a work tree)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for rel in files:
        if (REPO / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, clone / rel)
    venv = Path(sys.prefix)
    env = {**os.environ, "QUEST_PRESET": "tiny", "QUEST_DATA_LOCATION": str(cifar_archive),
           "QUEST_TEACHER_CHECKPOINT": str(teacher_checkpoint)}
    # -o: never remake the venv's install stamp, which would point the shared venv's
    # editable install at this temporary clone
    out = subprocess.run(["make", "-o", f"{venv}/.installed", "run", f"VENV={venv}"],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert load_records(clone / "results" / "runs")  # the run recorded its students
    for study in sorted((clone / "studies").glob("*.yaml")):
        assert main(["study", str(study), "--root", str(clone), "--check"]) == 0, study.name


@pytest.mark.slow
def test_gpu_study_is_the_published_protocol_and_runs_on_the_tiny_preset(
        study_root: Path) -> None:
    """studies/gpu-cifar10.yaml: CUDA, bf16, channels_last, compile, the cifar10-full schedule;
    tried here on the CPU with the tiny preset (device, compile and the length swapped)."""
    from quest.apps.study.spec import load_study, setting_config

    study = load_study(REPO / "studies" / "gpu-cifar10.yaml", REPO)
    published = setting_config(study, study.settings[1], REPO)
    assert study.preset == "cifar10-full" and study.settings[1].name == "published"
    assert published.runtime.device == "cuda" and published.runtime.amp == "bf16"
    assert published.runtime.compile and published.runtime.channels_last
    t = published.student.train
    assert (t.epochs, t.batch_size, t.lr, t.nesterov, t.schedule, t.milestones) == (
        240, 64, 0.05, True, "step", [150, 180, 210])
    assert published.codebook.k == 4096 and published.data.subset.train_per_class is None
    text = (REPO / "studies" / "gpu-cifar10.yaml").read_text()
    text = (text.replace("preset: cifar10-full", "preset: tiny")
            .replace("runtime.device: cuda", "runtime.device: cpu")
            .replace("runtime.compile: true", "runtime.compile: false")
            .replace("student.train.epochs: 30", "student.train.epochs: 2"))
    (study_root / "studies" / "gpu-cifar10.yaml").write_text(text)
    assert main(["study", str(study_root / "studies" / "gpu-cifar10.yaml"), "--root",
                 str(study_root), "--setting", "short"]) == 0
    recs = load_records(study_root / "results" / "gpu-cifar10")
    assert sorted(r["method"] for r in recs) == ["ce", "kd", "quest"]
    assert all(r["device"].startswith("cpu") and r["setting"] == "short" for r in recs)


def _records_study(root: Path, name: str, text: str) -> tuple[Study, Path]:
    """A study file `name` with the repository's params under `root`, loaded, and the empty
    folder its records go to (the figure and table tests write records there, not train)."""
    from quest.apps.study.spec import load_study

    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "studies").mkdir()
    (root / "studies" / f"{name}.yaml").write_text(text)
    out = root / "results" / name
    out.mkdir(parents=True)
    return load_study(root / "studies" / f"{name}.yaml", root), out


@pytest.mark.slow
def test_size_study_figure_and_report_section(tmp_path: Path) -> None:
    """A study over training-set sizes gets a top-1 vs images-per-class figure, in TABLE.md, the
    evidence-page block and the report's studies section (records written here, not trained)."""
    from PIL import Image

    from quest.apps.report.build import study_sections
    from quest.apps.report.render import markdown_to_html
    from quest.apps.study.spec import planned_runs
    from quest.apps.study.table import SIZE_FIGURE, update_tables

    study, out = _records_study(tmp_path, "sizes",
        "methods: [ce, kd]\nseeds: [0, 1]\nsettings:\n"
        "  - name: n10\n    set: {data.subset.train_per_class: 10}\n"
        "  - name: n20\n    set: {data.subset.train_per_class: 20}\n"
        "  - name: n20-hot\n    set: {data.subset.train_per_class: 20, student.kd.temperature: 8}\n"
        "    methods: [kd]\n"
        "  - name: n20-feat\n    set: {data.subset.train_per_class: 20}\n"
        "    methods: [quest, fitnet]\n")
    for i, (setting, method, seed, _, h) in enumerate(planned_runs(study, tmp_path)):
        (out / f"{i:02d}.json").write_text(json.dumps({
            "finished_at": f"t{i:02d}", "method": method, "seed": seed, "params_hash": h,
            "setting": setting.name, "top1": 0.3 + 0.01 * i, "top5": 0.9,
            "val_top1": 0.3 + 0.01 * i, "history": []}))
    written = update_tables(study, tmp_path)
    assert (out / SIZE_FIGURE).is_file() and Image.open(out / SIZE_FIGURE).size[0] > 100
    readme = (tmp_path / "docs" / "evidence.md").read_text()
    assert f"results/sizes/{SIZE_FIGURE}" in readme and tmp_path / "docs/evidence.md" in written
    # n20-hot runs KD only; it is compared with n20's CE runs (the same CE settings)
    row = next(line for line in readme.splitlines() if line.startswith("| n20-hot | kd | 0,1 |"))
    assert "(n=2)" in row.split("|")[6] and "| n20-hot | ce |" not in readme
    # the best-of table sets every method the study ran beside the best KD of the same
    # schedule, FitNets included; n10 (no QuEST there) gets no rows, n20's KD is its own
    best = readme[readme.index("| schedule | method | best setting (on val) |"):].splitlines()
    rows = [line.split("|") for line in best[2:best.index("")]]
    assert [r[2].strip() for r in rows] == ["ce", "kd", "quest", "fitnet"]
    assert {r[1].strip().split(" train images")[0] for r in rows} == {"20"}
    ((name, _, body, plots),) = study_sections(tmp_path)
    assert name == "sizes" and [p.name for p in plots] == ["study_sizes"] and body in readme
    html = markdown_to_html(body)
    assert html.count("<table>") == 3 and "<td>n20-hot</td>" in html  # runs, best, diagnostics


def test_word_accuracy_correlation_and_figure(tmp_path: Path) -> None:
    """Across settings that train QuEST on the same data and steps, the table states Pearson's
    r of top-1 against word accuracy (settings that share their runs count once; another
    schedule is left out) and draws the figure; below five settings neither appears."""
    from PIL import Image

    from quest.apps.report.build import study_sections
    from quest.apps.study.spec import load_study, planned_runs
    from quest.apps.study.table import WORD_FIGURE, update_tables, word_points

    weights = [0.3, 1.0, 3.0, 10.0, 30.0]
    # `default` is params.yaml's weight 10: it shares w10.0's runs, which keep w10.0's label
    settings = "  - name: default\n" + "".join(
        f"  - name: w{w}\n    set: {{student.quest.weight: {w}}}\n" for w in weights)
    settings += ("  - name: same\n    set: {student.quest.weight: 30.0}\n"  # w30.0's runs
                 "  - name: short\n    set: {student.quest.weight: 30.0, "
                 "student.train.epochs: 2}\n")
    study, out = _records_study(tmp_path, "words",
                                f"methods: [quest]\nseeds: [0, 1]\nsettings:\n{settings}")
    truth: dict[str, tuple[float, float]] = {}
    plan = [run for run in planned_runs(study, tmp_path) if run[0].name not in ("same", "default")]
    for i, (setting, method, seed, _, h) in enumerate(plan):  # `same` reads w30.0's records
        w = 0.1 + 0.05 * (i // 2) + 0.01 * seed
        top1 = 0.5 + 0.4 * w + (0.02 if i % 4 == 1 else 0.0) + 0.01 * seed
        truth.setdefault(setting.name, (0.0, 0.0))
        a, b = truth[setting.name]
        truth[setting.name] = (a + w / 2, b + 100 * top1 / 2)
        (out / f"{i:02d}.json").write_text(json.dumps({
            "finished_at": f"t{i:02d}", "method": method, "seed": seed, "params_hash": h,
            "setting": setting.name, "top1": top1, "top5": 0.9,
            "history": [{"epoch": 1, "word_accuracy": w}]}))
    (tmp_path / "README.md").write_text("# x\n")
    update_tables(study, tmp_path)
    table = (out / "TABLE.md").read_text()
    xs, ys = zip(*(truth[f"w{w}"] for w in weights), strict=True)
    r = float(np.corrcoef(xs, ys)[0, 1])
    assert "over the 5 settings" in table and f"Pearson r = {r:.2f}" in table
    assert sorted(p.setting for p in word_points(study, tmp_path)) == sorted(f"w{w}"
                                                                             for w in weights)
    assert Image.open(out / WORD_FIGURE).size[0] > 100
    assert f"results/words/{WORD_FIGURE}" in (tmp_path / "docs" / "evidence.md").read_text()
    ((_, _, _, plots),) = study_sections(tmp_path)
    assert [p.name for p in plots] == ["study_words_words"]
    # four comparable settings are too few to correlate: no sentence, no figure
    text = (tmp_path / "studies" / "words.yaml").read_text()
    (tmp_path / "studies" / "words.yaml").write_text(
        text.replace("  - name: w0.3\n", "  - name: w0.3\n    seeds: [7]\n"))
    study = load_study(tmp_path / "studies" / "words.yaml", tmp_path)
    update_tables(study, tmp_path)
    assert "Pearson" not in (out / "TABLE.md").read_text()
    assert WORD_FIGURE not in (tmp_path / "docs" / "evidence.md").read_text()


@pytest.mark.slow
def test_training_length_series_and_figure(tmp_path: Path) -> None:
    """A study that trains a method at three or more lengths gets a top-1 vs epochs figure: a
    setting's runs at other lengths are found through its config with only the epochs changed,
    shared runs count once, and a method with two series is labelled by setting; with two
    lengths there is no figure."""
    from PIL import Image

    from quest.apps.report.build import study_sections
    from quest.apps.study.spec import load_study, planned_runs
    from quest.apps.study.table import LENGTH_FIGURE, length_series, update_tables

    settings = ("  - name: default\n"  # params.yaml's 6 epochs
                "  - name: e2\n    set: {student.train.epochs: 2}\n"
                "  - name: e4\n    set: {student.train.epochs: 4}\n"
                "  - name: same\n    set: {student.train.epochs: 4}\n"  # e4's runs again
                "  - name: w3\n    set: {student.quest.weight: 3.0}\n    methods: [quest]\n"
                "  - name: w3-e2\n    set: {student.quest.weight: 3.0, student.train.epochs: 2}\n"
                "    methods: [quest]\n"
                "  - name: w3-e4\n    set: {student.quest.weight: 3.0, student.train.epochs: 4}\n"
                "    methods: [quest]\n"
                "  - name: w7\n    set: {student.quest.weight: 7.0}\n    methods: [quest]\n")
    study, out = _records_study(tmp_path, "len",
                                f"methods: [ce, quest]\nseeds: [0, 1]\nsettings:\n{settings}")

    def top1(cfg: Config, method: str, seed: int) -> float:
        weight = cfg.student.quest.weight if method == "quest" else 0.0
        return 0.3 + 0.05 * cfg.student.train.epochs + 0.01 * weight + 0.001 * seed

    for i, (setting, method, seed, cfg, h) in enumerate(planned_runs(study, tmp_path)):
        (out / f"{i:02d}.json").write_text(json.dumps({
            "finished_at": f"t{i:02d}", "method": method, "seed": seed, "params_hash": h,
            "setting": setting.name, "top1": top1(cfg, method, seed), "top5": 0.9,
            "history": []}))
    series = length_series(study, tmp_path)
    assert list(series) == ["ce", "quest (default)", "quest (w3)"]  # w7: one length only

    def expect(weight: float) -> dict[int, list[float]]:
        return {e: [100 * (0.3 + 0.05 * e + 0.01 * weight + 0.001 * s) for s in (0, 1)]
                for e in (2, 4, 6)}

    for label, weight in (("ce", 0.0), ("quest (default)", 10.0), ("quest (w3)", 3.0)):
        assert series[label].keys() == {2, 4, 6}
        for e in (2, 4, 6):
            assert sorted(series[label][e]) == pytest.approx(expect(weight)[e])
    (tmp_path / "README.md").write_text("# x\n")
    update_tables(study, tmp_path)
    assert Image.open(out / LENGTH_FIGURE).size[0] > 100
    assert f"results/len/{LENGTH_FIGURE}" in (tmp_path / "docs" / "evidence.md").read_text()
    assert LENGTH_FIGURE in (out / "TABLE.md").read_text()
    ((_, _, _, plots),) = study_sections(tmp_path)
    assert "study_len_epochs" in [p.name for p in plots]
    # two lengths make no trend: no series, no figure
    (tmp_path / "studies" / "len.yaml").write_text(
        f"methods: [ce, quest]\nseeds: [0, 1]\nsettings:\n{settings}".replace("2}", "4}"))
    study = load_study(tmp_path / "studies" / "len.yaml", tmp_path)
    assert length_series(study, tmp_path) == {}
    update_tables(study, tmp_path)
    assert LENGTH_FIGURE not in (tmp_path / "docs" / "evidence.md").read_text()
