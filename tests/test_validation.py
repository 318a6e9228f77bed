"""Great Expectations suites on real data: each passes on a real smoke chain and fails, with a
one-line message naming what failed, on data broken in one specific way."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quest.apps.cli import main
from quest.infra.config import Config, load_config
from quest.infra.errors import QuestError
from quest.infra.paths import Paths

REPO = Path(__file__).resolve().parents[1]
SUITES = ("data", "features", "codebook", "predictions")


def _cfg(teacher_checkpoint: Path, *extra: str) -> Config:
    # one QuEST student, one epoch: the chain exists to give every suite real inputs
    return load_config(REPO / "params.yaml", "smoke", [
        f"teacher.checkpoint={teacher_checkpoint}", "student.methods=[quest]",
        "student.train.epochs=1", "runtime.threads=1", *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, smoke_prepared: Path,
          teacher_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """The smoke data through teacher, features, codebook, a quest student and evaluate."""
    from quest.apps.stages.codebook import run_codebook
    from quest.apps.stages.evaluate import run_evaluate
    from quest.apps.stages.features import run_features
    from quest.apps.stages.student import run_student
    from quest.apps.stages.teacher import run_teacher

    root = tmp_path_factory.mktemp("validation-chain")
    shutil.copytree(smoke_prepared, root / "data" / "prepared")
    cfg, paths = _cfg(teacher_checkpoint), Paths(root)
    run_teacher(cfg, paths)
    run_features(cfg, paths)
    run_codebook(cfg, paths)
    run_student(cfg, paths, "quest")
    run_evaluate(cfg, paths)
    yield {"root": root, "cfg": cfg, "paths": paths}


def _copy(chain: dict[str, Any], dest: Path, *rels: str) -> Paths:
    """A new root holding copies of some of the chain's outputs (tests may break them)."""
    for rel in rels:
        src = chain["root"] / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / rel)
    return Paths(dest)


def _fails(what: str, cfg: Config, paths: Paths) -> str:
    """Run a suite that must fail; return its message after checking the files it left."""
    from quest.apps.stage_table import report_files
    from quest.apps.validation import run_validation

    with pytest.raises(QuestError) as err:
        run_validation(what, cfg, paths)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{what} validation failed")
    files = report_files(paths, what)
    report = json.loads(files["report"].read_text())
    assert report["success"] is False and report["failed"] >= 1
    assert (files["docs"] / "index.html").is_file()
    assert not files["passed"].exists()  # no gate for the next stage
    return msg


@pytest.mark.slow
def test_every_suite_passes_on_the_smoke_chain(chain: dict[str, Any]) -> None:
    from quest.apps.stage_table import report_files
    from quest.apps.validation import run_validation

    paths = chain["paths"]
    for what in SUITES:
        report = run_validation(what, chain["cfg"], paths)
        assert report["success"] and report["failed"] == 0 and report["passed"] >= 3, report
        files = report_files(paths, what)
        assert json.loads(files["report"].read_text())["passed"] == report["passed"]
        assert (files["docs"] / "index.html").is_file()
        # the gate holds only what was checked, so a threshold edit leaves it byte-identical
        gate = json.loads(files["passed"].read_text())
        assert gate == {"suite": what, "inputs": report["inputs"]}
    observed = json.loads((paths.root / "reports/validation/data.json").read_text())["observed"]
    assert observed["duplicates_test_in_train"] == 0
    assert observed["class_counts"]["train"]["cat"] == 30
    # the smoke preset's validation split: disjoint from train and test, drawn outside the
    # training subset
    assert observed["class_counts"]["val"]["cat"] == 5
    assert observed["duplicates_val_in_train"] == observed["duplicates_val_in_test"] == 0
    assert observed["validation"]["drawn_from"].startswith("the training pool outside")
    features = json.loads((paths.root / "reports/validation/features.json").read_text())
    assert features["observed"]["vectors"] == 300 * 8 * 8  # max_vectors: null in smoke


@pytest.mark.slow
def test_quest_run_stops_at_data_validation_when_a_class_is_missing(
        tmp_path: Path, smoke_prepared: Path, teacher_checkpoint: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from quest.core.data.prepared import load_prepared

    # an image folder from the smoke slice with the cats all but removed from train/ (one left:
    # the reader itself refuses an empty class folder)
    ds = load_prepared(smoke_prepared)
    folder = tmp_path / "images"
    for split_name, split in (("train", ds.train), ("test", ds.test)):
        for cls in ds.classes:
            (folder / split_name / cls).mkdir(parents=True)
        for i, (img, label) in enumerate(zip(split.images, split.labels, strict=True)):
            cat = split_name == "train" and ds.classes[label] == "cat"
            if cat and any((folder / "train" / "cat").iterdir()):
                continue
            Image.fromarray(img.transpose(1, 2, 0)).save(
                folder / split_name / ds.classes[label] / f"{i}.png")
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    monkeypatch.setenv("QUEST_DATA_LOCATION", str(folder))
    monkeypatch.setenv("QUEST_TEACHER_CHECKPOINT", str(teacher_checkpoint))
    rc = main(["run", "--root", str(root), "--preset", "smoke",
               "--set", "data.subset.train_per_class=null", "--set", "runtime.threads=1",
               # one cat image could not also give a validation split
               "--set", "data.validation_per_class=0"])
    # stderr also carries the stages' log lines; the error is one line of its own
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("quest: error:")]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("quest: error: data validation failed"), err
    assert "every class holds at least 50%" in err[0] and "class=cat" in err[0], err[0]
    assert (root / "data" / "prepared" / "meta.json").is_file()  # prepare ran
    assert not (root / "models" / "teacher").exists()  # the teacher never started
    report = json.loads((root / "reports" / "validation" / "data.json").read_text())
    failed = [e for e in report["expectations"] if not e["success"]]
    assert [e["table"] for e in failed] == ["classes"]
    assert report["observed"]["class_counts"]["train"]["cat"] == 1


@pytest.mark.slow
def test_nan_features_fail(chain: dict[str, Any], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    paths = _copy(chain, tmp_path, "data/prepared", "data/features")
    feats = np.load(paths.features)
    feats[[3, 70]] = np.nan
    feats[5, 0] = np.inf
    np.save(paths.features, feats)
    msg = _fails("features", chain["cfg"], paths)
    assert "no NaN or Inf in any feature vector (3 of 19200 rows fail" in msg, msg
    # the CLI says the same on one line, exit code 2
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    rc = main(["validate", "--what", "features", "--root", str(tmp_path), "--preset", "smoke"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("quest: error:")]
    assert rc == 2 and len(err) == 1 and "no NaN or Inf" in err[0], err
    # a vector count other than the configured one fails too
    np.save(paths.features, np.load(chain["paths"].features)[:1000])
    assert "19200 vectors" in _fails("features", chain["cfg"], paths)


@pytest.mark.slow
def test_codebook_with_dead_or_nan_words_fails(chain: dict[str, Any], tmp_path: Path) -> None:
    paths = _copy(chain, tmp_path, "data/features", "models/codebook")
    words = np.load(paths.codebook)
    k = words.shape[0]
    # a quarter of the words moved far away from every feature vector: none is ever nearest
    words[: k // 4] = 1e4
    np.save(paths.codebook, words)
    msg = _fails("codebook", chain["cfg"], paths)
    assert "at most 5% of the 64 words are dead" in msg and "16 of 64 rows fail" in msg, msg
    report = json.loads((tmp_path / "reports/validation/codebook.json").read_text())
    assert report["observed"]["dead_words"] == 16
    words[0] = np.nan
    np.save(paths.codebook, words)
    assert "no NaN or Inf in any word (1 of 64 rows fail" in _fails("codebook", chain["cfg"],
                                                                   paths)


@pytest.mark.slow
def test_predictions_not_summing_to_one_or_below_chance_fail(chain: dict[str, Any],
                                                             tmp_path: Path) -> None:
    from quest.apps.validation.runner import run_suite
    from quest.apps.validation.suites import predictions_suite, student_probabilities

    cfg, paths = chain["cfg"], Paths(tmp_path)
    probs, labels = student_probabilities(cfg, chain["paths"])
    good = probs["quest"]
    np.testing.assert_allclose(good.sum(axis=1), 1.0, atol=1e-5)
    thresholds = cfg.to_dict()["validation"]["predictions"]

    def run(p: np.ndarray, config: Config = cfg) -> str:
        suite = predictions_suite(config, paths, ({"quest": p}, labels))
        with pytest.raises(QuestError) as err:
            run_suite("predictions", suite, paths, thresholds)
        return str(err.value)

    msg = run(good * 0.9)  # e.g. probabilities renormalised over the wrong axis
    assert "sum to 1 (+/- 0.001) (100 of 100 rows fail" in msg, msg
    nan = good.copy()
    nan[0, 0] = np.nan
    assert "no NaN in any probability (1 of 100 rows fail" in run(nan)
    # always the least likely class: top-1 0 against chance 0.1, with the default gate of 1x
    strict = _cfg(Path("unused"), "validation.predictions.min_top1_over_chance=1.0")
    wrong = np.zeros_like(good)
    wrong[np.arange(len(labels)), (labels + 1) % good.shape[1]] = 1.0
    msg = run(wrong, strict)
    assert "each student's top-1 >= 1 x chance (1 of 1 rows fail" in msg, msg
    assert "top1=0 model=quest min_top1=0.1" in msg, msg


def test_thresholds_are_validated(teacher_checkpoint: Path) -> None:
    with pytest.raises(QuestError, match=r"validation.codebook.max_dead_share is 1.5"):
        _cfg(teacher_checkpoint, "validation.codebook.max_dead_share=1.5")
    with pytest.raises(QuestError, match=r"norm_min <= norm_max"):
        _cfg(teacher_checkpoint, "validation.features.norm_min=5", "validation.features.norm_max=1")
    with pytest.raises(QuestError, match=r"unknown setting 'validation.data.min_share'"):
        _cfg(teacher_checkpoint, "validation.data.min_share=0.1")


# One failing case per gate of the data, features and codebook suites (issue 29): each breaks
# one thing in a copy of the chain's outputs and names the expectation the message must carry.


def _prepared_copy(chain: dict[str, Any], tmp_path: Path) -> tuple[Paths, dict[str, np.ndarray]]:
    paths = _copy(chain, tmp_path, "data/prepared")
    arrays = {name: np.load(paths.prepared / f"{name}.npy")
              for name in ("train_images", "train_labels", "test_images", "test_labels")}
    return paths, arrays


def _save(paths: Paths, **arrays: np.ndarray) -> None:
    for name, value in arrays.items():
        np.save(paths.prepared / f"{name}.npy", value)


@pytest.mark.slow
def test_test_images_duplicated_in_train_fail_the_data_suite(chain: dict[str, Any],
                                                            tmp_path: Path) -> None:
    paths, a = _prepared_copy(chain, tmp_path)
    test = a["test_images"].copy()
    test[:5] = a["train_images"][:5]  # 5 of 100 test images; the gate allows 1% (1 image)
    _save(paths, test_images=test)
    msg = _fails("data", chain["cfg"], paths)
    assert "at most 1 test images" in msg and "exact duplicates of training images" in msg, msg
    report = json.loads((tmp_path / "reports/validation/data.json").read_text())
    assert report["observed"]["duplicates_test_in_train"] == 5


@pytest.mark.slow
def test_a_label_out_of_range_fails_the_data_suite(chain: dict[str, Any],
                                                   tmp_path: Path) -> None:
    paths, a = _prepared_copy(chain, tmp_path)
    labels = a["train_labels"].copy()
    labels[7] = 10  # ten classes: labels 0..9
    _save(paths, train_labels=labels)
    with pytest.raises(QuestError) as err:
        from quest.apps.validation import run_validation

        run_validation("data", chain["cfg"], paths)
    msg = str(err.value)
    assert "\n" not in msg and ("labels lie in [0, 9]" in msg or "label" in msg), msg


@pytest.mark.slow
def test_implausible_pixel_statistics_fail_the_data_suite(chain: dict[str, Any],
                                                          tmp_path: Path) -> None:
    paths, a = _prepared_copy(chain, tmp_path)
    _save(paths, train_images=np.zeros_like(a["train_images"]))  # black: mean 0, std 0
    msg = _fails("data", chain["cfg"], paths)
    assert "train mean pixel value in [20" in msg, msg
    assert "train mean per-image pixel std >= 10" in msg, msg
    assert "test mean pixel value" not in msg  # the test split is untouched


@pytest.mark.slow
def test_feature_norms_out_of_range_fail_the_features_suite(chain: dict[str, Any],
                                                            tmp_path: Path) -> None:
    paths = _copy(chain, tmp_path, "data/prepared", "data/features")
    feats = np.load(paths.features)
    feats[:10] *= 1e6  # ten vectors far beyond norm_max
    np.save(paths.features, feats)
    msg = _fails("features", chain["cfg"], paths)
    assert "vector L2 norms in [0.01, 1000]" in msg and "10 of 19200 rows fail" in msg, msg


@pytest.mark.slow
def test_a_low_codebook_perplexity_fails_the_codebook_suite(chain: dict[str, Any],
                                                            tmp_path: Path) -> None:
    paths = _copy(chain, tmp_path, "data/features", "models/codebook")
    observed = json.loads((chain["root"] / "reports/validation/codebook.json").read_text()) \
        if (chain["root"] / "reports/validation/codebook.json").is_file() else None
    # the same codebook against a floor just above its own perplexity: only that gate fails
    from quest.apps.validation import run_validation

    perplexity = (observed or run_validation("codebook", chain["cfg"], paths))["observed"][
        "perplexity"]
    share = min(1.0, perplexity / 64 + 0.01)
    cfg = _cfg(chain["cfg"].teacher.checkpoint, f"validation.codebook.min_perplexity_share={share}")
    msg = _fails("codebook", cfg, paths)
    assert "usage perplexity >=" in msg and "dead" not in msg, msg


def _pages(docs: Path) -> dict[str, str]:
    """Every page of a Data Docs site, keyed and stripped of run times and ids."""
    import re

    stamp = re.compile(r"\d{8}T\d{6}(\.\d+)?Z"  # run names and the logo's ?d=
                       r"|\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(\+\d\d:\d\d| UTC|Z)?"
                       r"|\b\d{10}(\.\d+)?\b"  # sort keys: seconds since 1970
                       r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    return {stamp.sub("~", p.relative_to(docs).as_posix()): stamp.sub("~", p.read_text())
            for p in sorted(docs.rglob("*.html"))}


@pytest.mark.slow
def test_data_docs_render_as_gx_s_own_views_with_templates_compiled_once(
        chain: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quest's views keep one jinja2 Environment per process (GX makes one per page): the pages
    they write are GX's own, byte for byte once run times and ids are masked."""
    import difflib

    import quest.apps.validation.runner as runner
    from quest.apps.stage_table import report_files
    from quest.apps.validation.docs_views import IndexPageView, PageView, gx_site

    rels = ("models/codebook", "metrics/codebook.json", "data/features")
    ours = _copy(chain, tmp_path / "ours", *rels)
    runner.validate("codebook", chain["cfg"], ours)
    assert PageView().env is PageView().env and IndexPageView().env is IndexPageView().env
    monkeypatch.setattr(runner, "site_config", gx_site)  # GX's default views and index
    theirs = _copy(chain, tmp_path / "theirs", *rels)
    runner.validate("codebook", chain["cfg"], theirs)
    mine, gx = (_pages(report_files(p, "codebook")["docs"]) for p in (ours, theirs))
    assert len(mine) >= 3 and mine.keys() == gx.keys()
    for page, html in mine.items():
        assert html == gx[page], "\n".join(difflib.unified_diff(
            gx[page].splitlines(), html.splitlines(), lineterm="", n=0))
