"""The README's headline table is what the run records give, recomputed by scripts/headline.py
from results/main-job-val/ alone (standard library and scipy, no quest code): a record added or
changed without the README following fails here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# README row label (its first cell, bold and italics stripped) -> the study settings it shows
ROWS = {
    "CE": ["ce"],
    "KD (RepDistiller's 0.1 CE + 0.9 KD, T = 4)": ["kd-T4"],
    "FitNets, chosen on validation (hint at stage 3, weight 10)": ["fitnet-l3-w10"],
    "FitNets at its published setting (hint at stage 2, weight 100)": ["fitnet-l2-w100"],
    "QuEST, two levels (the default)": ["q-l3l2-K256-w10"],
    "attention transfer": ["at"],
    "seed 0 only: QuEST, one level (layer3)": ["q-l3-K256-w10"],
    "DKD (β 8) / CRD (0.8·CRD), untuned": ["dkd", "crd"],
}


def _headline():
    spec = importlib.util.spec_from_file_location("headline", REPO / "scripts" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_rows() -> dict[str, list[str]]:
    """The cells of the README's headline table, keyed by the first one."""
    text = (REPO / "README.md").read_text()
    table = text.split("| method (setting) | val top-1 % | test top-1 % |", 1)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [re.sub(r"[*]", "", c).strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_readme_headline_table_is_recomputed_from_the_records() -> None:
    hl = _headline()
    recs = hl.load(REPO / "results" / "main-job-val")
    rows = _readme_rows()
    assert set(rows) == set(ROWS)
    for label, settings in ROWS.items():
        got = [hl.summary(recs, s) for s in settings]
        expected = [
            " / ".join(hl.cell(g["val"]) for g in got),
            " / ".join(hl.cell(g["test"]) for g in got),
            "" if settings == [hl.KD] else " / ".join(hl.cell(g["delta_kd"], signed=True)
                                                     for g in got),
        ]
        assert rows[label] == expected, label
        # a row with fewer seeds says which ("seed 0 only: ...", "seeds 0-1: ..."); the others
        # are seeds 0-2
        seeds = {"seed 0 only": [0], "seeds 0-1": [0, 1]}.get(label.split(":")[0], [0, 1, 2])
        assert all(g["seeds"] == seeds for g in got), (label, [g["seeds"] for g in got])
    # the README says: one CPU model and one training-code version for every row
    every = [hl.summary(recs, s) for ss in ROWS.values() for s in ss]
    assert len({c for g in every for c in g["cpus"]}) == 1
    assert len({c for g in every for c in g["code"]}) == 1


def test_the_readme_quest_against_fitnets_is_recomputed_from_the_records() -> None:
    """The prose's paired differences between two-level QuEST and FitNets (chosen on validation,
    and at its published setting), test and validation, with their per-seed values."""
    hl = _headline()
    recs = hl.load(REPO / "results" / "main-job-val")
    text = " ".join((REPO / "README.md").read_text().split())
    chosen, published = "fitnet-l3-w10", "fitnet-l2-w100"
    test_diffs, test = hl.paired(recs, hl.QUEST, chosen)
    val_diffs, val = hl.paired(recs, hl.QUEST, chosen, "val_top1")
    assert f"**{hl.cell(test, signed=True)} points on test** ({hl.per_seed(test_diffs)})" in text
    assert f"**{hl.cell(val, signed=True)} on validation** ({hl.per_seed(val_diffs)})" in text
    # the chosen setting is validation's pick among FitNets' seed-0 grid
    grid = {s: r["val_top1"] for (s, seed), r in recs.items()
            if s.startswith("fitnet-") and seed == 0}
    assert len(grid) == 9 and max(grid, key=grid.get) == chosen
    _, test = hl.paired(recs, hl.QUEST, published)
    _, val = hl.paired(recs, hl.QUEST, published, "val_top1")
    assert (f"{hl.cell(test, signed=True)} on test, {hl.cell(val, signed=True)} on validation"
            in text)
