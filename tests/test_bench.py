"""`quest bench` end to end at tiny sizes: every section runs and the JSON holds the ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quest.apps.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert main(["bench", "--params", str(REPO / "params.yaml"), "--root", str(tmp_path),
                 "--synthetic", "--images", "256", "--rounds", "1", "--steps", "1",
                 "--kmeans-k", "32", "--kmeans-iterations", "2", "--set", "codebook.k=64",
                 "--set", "runtime.threads=1", "--out-dir", str(out)]) == 0
    report = json.loads((out / "bench-cpu.json").read_text())
    assert report["data"] == {"source": "synthetic uniform uint8", "images": 256,
                              "shape": [3, 32, 32]}
    assert report["loader"]["ratio_in_memory_over_dataloader"] > 0
    steps = report["steps"]
    assert steps["k"] == 64 and steps["ratio_quest_over_kd"] == pytest.approx(
        steps["quest_ms_per_step"] / steps["kd_ms_per_step"], rel=1e-2)
    assert [km["k"] for km in report["kmeans"]] == [32]
    assert report["features"]["images_per_s"] > 0 and report["host_rss_max_mib"] > 0
    assert set(report["goals"]) >= {"quest_step_at_most_1.25x_kd_k64"}
