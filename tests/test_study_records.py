"""Which record a study's table reads when several studies recorded the same run."""

from __future__ import annotations

import json
from pathlib import Path

from quest.apps.study.runs import recorded_runs


def _record(root: Path, folder: str, study: str, finished: str, top1: float) -> None:
    path = root / "results" / folder / f"{finished.replace(':', '')}-quest-s0.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"params_hash": "h", "method": "quest", "seed": 0,
                                "study": study, "finished_at": finished, "top1": top1}))


def test_a_study_reads_its_own_record_first_and_the_latest_otherwise(tmp_path: Path) -> None:
    _record(tmp_path, "main-job", "main-job", "2026-11-28T00:00:00Z", 0.74)
    _record(tmp_path, "main-job-val", "main-job-val", "2026-12-07T00:00:00Z", 0.73)
    # an older alias of the main-job record inside the rerunning study's folder
    _record(tmp_path, "main-job-val", "main-job", "2026-11-28T00:00:01Z", 0.74)
    # neither a single run nor the code-equivalence evidence is a study record
    _record(tmp_path, "runs", "main-job", "2026-12-08T00:00:00Z", 0.10)
    evidence = tmp_path / "results" / "code-equivalence" / "b-a.json"
    evidence.parent.mkdir()
    evidence.write_text(json.dumps({"old": "a", "new": "b", "identical": True}))
    key = ("h", "quest", 0)
    assert recorded_runs(tmp_path, "main-job")[key]["top1"] == 0.74
    assert recorded_runs(tmp_path, "main-job-val")[key]["top1"] == 0.73
    assert recorded_runs(tmp_path)[key]["top1"] == 0.73  # no study: the latest
    assert recorded_runs(tmp_path, "low-data")[key]["top1"] == 0.73


def test_a_resumed_run_counts_its_training_time_whole() -> None:
    """wall_seconds covers the process that finished a run; the table sums the epochs' seconds,
    which count the part of an epoch done before a resume too."""
    from quest.apps.study.table import run_seconds

    resumed = {"wall_seconds": 151.8,
               "history": [{"seconds": 224.0}, {"seconds": 619.0}, {"seconds": 146.0}]}
    assert run_seconds(resumed) == 989.0
    # records without per-epoch seconds fall back to the wall clock; none at all: no number
    assert run_seconds({"wall_seconds": 42.0, "history": [{"loss": 1.0}]}) == 42.0
    assert run_seconds({"history": []}) is None
