"""`quest report` on a real small run, and progress reporting of features and k-means."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from quest.apps.cli import main

REPO = Path(__file__).resolve().parents[1]
METHODS = ["ce", "quest"]
WORDS, PATCHES = 5, 12


def _overrides(archive: Path, checkpoint: Path) -> list[str]:
    # resnet8 students (a third of resnet20's MACs) keep the run short; the report reads files
    return [f"data.location={archive}", f"teacher.checkpoint={checkpoint}",
            f"student.methods=[{', '.join(METHODS)}]", "student.arch=resnet8",
            f"report.gallery_words={WORDS}", f"report.gallery_patches={PATCHES}"]


class _Records(logging.Handler):
    """Keeps the messages of the 'quest' logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory, smoke_prepared: Path, cifar_archive: Path,
             teacher_checkpoint: Path) -> dict[str, Any]:
    """A finished smoke run (teacher, features, codebook, ce and quest students, evaluate)."""
    from quest.apps.stages.codebook import run_codebook
    from quest.apps.stages.evaluate import run_evaluate
    from quest.apps.stages.features import run_features
    from quest.apps.stages.student import run_student
    from quest.apps.stages.teacher import run_teacher
    from quest.infra.config import load_config
    from quest.infra.paths import Paths

    root = tmp_path_factory.mktemp("report-run")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(smoke_prepared, root / "data" / "prepared")
    overrides = _overrides(cifar_archive, teacher_checkpoint)
    cfg = load_config(root / "params.yaml", "smoke", overrides)
    assert cfg.runtime.progress == "lines"
    paths = Paths(root)
    logger = logging.getLogger("quest")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        run_teacher(cfg, paths)
        run_features(cfg, paths)
        run_codebook(cfg, paths)
        for method in METHODS:
            run_student(cfg, paths, method)
        run_evaluate(cfg, paths)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return {"root": root, "overrides": overrides, "log": records.lines, "cfg": cfg}


def _report_cli(root: Path, overrides: list[str], *extra: str) -> int:
    sets = [a for o in overrides for a in ("--set", o)]
    return main(["report", "--root", str(root), "--preset", "smoke", *sets, *extra])


def _images(html: str) -> list[Image.Image]:
    """Every embedded PNG, decoded (PIL checks the data)."""
    out = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        img.load()
        assert img.format == "PNG" and img.width > 0 and img.height > 0
        out.append(img)
    return out


def _section(html: str, anchor: str) -> str:
    """The HTML from <h2 id=anchor> to the next <h2>."""
    start = html.index(f'<h2 id="{anchor}">')
    end = html.find("<h2 ", start + 1)
    return html[start: end if end > 0 else len(html)]


def _rows(table_html: str) -> list[list[str]]:
    return [re.findall(r"<td[^>]*>([^<]*)</td>", row)
            for row in re.findall(r"<tr>(.*?)</tr>", table_html) if "<td" in row]


@pytest.mark.slow
def test_report_html_markdown_and_log(run_root: dict[str, Any],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = run_root["root"]
    assert _report_cli(root, run_root["overrides"]) == 0
    assert "reports/report.html" in capsys.readouterr().out
    html = (root / "reports" / "report.html").read_text(encoding="utf-8")
    # self-contained: no external scripts, styles or images
    assert not re.search(r'(src|href)="(?!data:|#)', html) and "<script" not in html
    # the accuracy table: teacher and every method with evaluate's numbers
    ev = json.loads((root / "metrics" / "evaluation.json").read_text())
    rows = {r[0]: r for r in _rows(_section(html, "accuracy"))}
    assert set(rows) == {"teacher", *METHODS}
    for name, r in ev["models"].items():
        assert rows[name][1:7] == [r["arch"], f"{100 * r['val_top1']:.2f}",
                                   f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}",
                                   f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}"]
    # the report's best student is chosen on validation
    best = max(METHODS, key=lambda m: ev["models"][m]["val_top1"])
    assert f"{best}: val top-1 {100 * ev['models'][best]['val_top1']:.2f} %" in html
    # codebook statistics from metrics/codebook.json
    cb = json.loads((root / "metrics" / "codebook.json").read_text())
    stats = dict(r[:2] for r in _rows(_section(html, "codebook")))
    assert stats["words K"] == "64" and stats["dead words"] == str(cb["dead_words"])
    assert stats["perplexity"] == f"{cb['perplexity']:.1f}"
    # curves (losses, accuracy, word accuracy) + codebook + one grid per gallery word
    images = _images(html)
    assert len(images) == 3 + 1 + WORDS
    gallery = _section(html, "gallery")
    assert gallery.count('class="word"') == WORDS
    # a grid: 8 columns of 12 px patches (3 x the 4 px stride) enlarged x4, 2 px gaps
    tile = 12 * 4
    grids = _images(gallery)
    assert len(grids) == WORDS
    assert all(g.size == (8 * (tile + 2) - 2, 2 * (tile + 2) - 2) for g in grids)
    assert "12×12 px patch" in gallery and "8×8 map on 32×32 images" in gallery
    # the Markdown links every figure, written beside it
    md = (root / "reports" / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert len(links) == len(images)
    for link in links:
        Image.open(root / "reports" / link).verify()
    assert sorted(p.name for p in (root / "reports" / "figures").iterdir()) == \
        sorted(Path(link).name for link in links)
    assert "| teacher | resnet56 |" in md
    # one log file for this command, holding its own lines
    logs = list((root / "logs").glob("report-*.log"))
    assert len(logs) == 1 and "report: " in logs[0].read_text()


@pytest.mark.slow
def test_compare_table_deltas_and_overlaid_curves(run_root: dict[str, Any],
                                                  tmp_path: Path) -> None:
    from quest.apps.report.build import build_report_data
    from quest.infra.paths import Paths

    root = run_root["root"]
    # the other run: the same files with known accuracies and without the quest student
    other = tmp_path / "baseline"
    for rel in ("metrics", "plots"):
        shutil.copytree(root / rel, other / rel)
    ev = json.loads((other / "metrics" / "evaluation.json").read_text())
    del ev["models"]["quest"]
    ev["models"]["ce"]["top1"], ev["models"]["ce"]["top5"] = 0.25, 0.5
    (other / "metrics" / "evaluation.json").write_text(json.dumps(ev))
    mine = json.loads((root / "metrics" / "evaluation.json").read_text())["models"]
    report = build_report_data(run_root["cfg"], Paths(root), other)
    assert report.comparison is not None
    rows = {r[0]: r for r in report.comparison.rows}
    assert set(rows) == {"teacher", "ce", "quest"}
    assert rows["teacher"][3] == "+0.00" and rows["teacher"][6] == "+0.00"

    def signed(d: float) -> str:
        d = round(d, 2)
        return f"+{d:.2f}" if d >= 0 else f"−{abs(d):.2f}"

    assert rows["ce"][1:] == [f"{100 * mine['ce']['top1']:.2f}", "25.00",
                              signed(100 * mine["ce"]["top1"] - 25),
                              f"{100 * mine['ce']['top5']:.2f}", "50.00",
                              signed(100 * mine["ce"]["top5"] - 50)]
    assert rows["quest"][2] == "—" and rows["quest"][3] == "—"
    assert report.comparison.header[1] == f"top-1 % ({root.name})"
    # both runs' curves in each figure (solid: this run, dashed: the other)
    assert [p.name for p in report.curves] == ["losses", "accuracy", "word_accuracy"]
    assert all("dashed: baseline" in p.caption for p in report.curves)
    assert report.codebook is not None and report.codebook.header[1:] == [root.name, "baseline"]


def test_missing_evaluation_is_one_line_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert main(["report", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quest: error: ")
    assert "evaluation.json does not exist: run `quest evaluate`" in err[0]
    assert not (tmp_path / "reports").exists()


def test_compare_run_missing_student_names_the_stage(run_root: dict[str, Any],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics").mkdir()
    shutil.copy(run_root["root"] / "metrics" / "evaluation.json", tmp_path / "metrics")
    assert _report_cli(run_root["root"], run_root["overrides"], "--compare", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `quest student --method ce`" in err[0]
    assert "(the --compare run)" in err[0]


def test_patch_geometry() -> None:
    from quest.apps.report.gallery import PAD_VALUE, crop_patch

    image = np.arange(3 * 32 * 32, dtype=np.int64).reshape(3, 32, 32).astype(np.uint8)
    # position (0, 0) of an 8x8 map: centre (2, 2), a 12 px patch starts at -4 (gray padding)
    p = crop_patch(image, 0, 0, (8, 8), 12)
    assert p.shape == (3, 12, 12)
    assert (p[:, :4, :] == PAD_VALUE).all() and (p[:, :, :4] == PAD_VALUE).all()
    assert (p[:, 4:, 4:] == image[:, :8, :8]).all()
    # an inner position: centre ((3+0.5)*4, (5+0.5)*4) = (14, 22) -> rows 8..19, cols 16..27
    assert (crop_patch(image, 3, 5, (8, 8), 12) == image[:, 8:20, 16:28]).all()


def test_spread_labels_lifts_only_labels_that_collide() -> None:
    from quest.apps.study.figures import spread_labels

    # three labels on one spot, one beside them and one far away
    boxes = [(10.0, 10.0, 60.0, 17.0), (12.0, 11.0, 70.0, 18.0), (11.0, 10.5, 40.0, 17.5),
             (100.0, 10.0, 150.0, 17.0), (10.0, 80.0, 60.0, 87.0)]
    lifts = spread_labels(boxes, gap=1.0)
    moved = [(x0, y0 + d, x1, y1 + d) for (x0, y0, x1, y1), d in zip(boxes, lifts, strict=True)]
    for i, a in enumerate(moved):
        for b in moved[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    # the lowest of the stacked three stays; the others stack in their order of height
    assert lifts[0] == 0.0 and lifts[3] == 0.0 and lifts[4] == 0.0
    assert moved[2][1] == pytest.approx(18.0) and moved[1][1] == pytest.approx(26.0)


@pytest.mark.slow
def test_report_package_imports_without_matplotlib() -> None:
    code = ("import sys, quest.apps.report, quest.apps.cli\n"
            "print('matplotlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_features_and_kmeans_report_progress_lines(run_root: dict[str, Any]) -> None:
    lines = run_root["log"]
    feats = [m for m in lines if m.startswith("features: step ")]
    assert feats and feats[-1].startswith("features: step 3/3 (100%)")  # 300 images, batch 100
    kmeans = [m for m in lines if m.startswith("codebook k-means: step ")]
    assert [m.split()[3] for m in kmeans] == [f"{i}/5" for i in range(1, 6)]
    assert all("objective" in m for m in kmeans)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_iteration_callback_leaves_the_result_unchanged(backend: str) -> None:
    from quest.core.codebook import fit_kmeans

    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    plain = fit_kmeans(x, 32, iterations=6, backend=backend)
    seen: list[tuple[int, int, float]] = []
    reported = fit_kmeans(x, 32, iterations=6, backend=backend,
                          on_iteration=lambda i, n, obj, split: seen.append((i, n, obj)))
    assert [(i, n) for i, n, _ in seen] == [(i, 6) for i in range(1, 7)]
    assert [obj for *_, obj in seen] == reported.objective == plain.objective
    assert np.array_equal(reported.centroids, plain.centroids)


def test_progress_lines_and_one_log_file_per_run(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from quest.infra.progress import Progress, setup_logging, track

    with caplog.at_level(logging.INFO, logger="quest"):
        assert list(track(range(25), 25, "loop", "lines", lines=True)) == list(range(25))
        with Progress(5, "quiet", "off") as p:
            for _ in range(5):
                p.update()
    msgs = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("quiet") for m in msgs)
    steps = [m for m in msgs if m.startswith("loop: step ")]
    assert len(steps) == 10 and steps[-1] == "loop: step 25/25 (100%)"
    logger = logging.getLogger("quest")
    setup_logging(str(tmp_path / "first.log"))
    logger.info("one")
    setup_logging(str(tmp_path / "second.log"))
    logger.info("two")
    files = [h for h in logger.handlers if getattr(h, "_quest_file", False)]
    assert len(files) == 1
    for h in files:
        logger.removeHandler(h)
        h.close()
    assert "two" not in (tmp_path / "first.log").read_text()
    assert "two" in (tmp_path / "second.log").read_text()


def test_report_templates_are_package_data() -> None:
    """An installed quest renders reports too: pyproject ships every template file."""
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["quest.apps.report"]
    templates = REPO / "quest" / "apps" / "report" / "templates"
    files = [p.relative_to(templates.parent).as_posix() for p in templates.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)
