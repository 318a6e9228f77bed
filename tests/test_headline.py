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
    "KD, chosen on validation (0.1 CE + 0.9 KD, T = 2)": ["kd-T2"],
    "KD at RepDistiller's setting (T = 4)": ["kd-T4"],
    "FitNets, chosen on validation (hint at stage 3, weight 10)": ["fitnet-l3-w10"],
    "FitNets at its published setting (hint at stage 2, weight 100)": ["fitnet-l2-w100"],
    "QuEST, two levels (the default)": ["q-l3l2-K256-w10"],
    "attention transfer": ["at"],
    "QuEST, one level (layer3, the paper's single level)": ["q-l3-K256-w10"],
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


def test_the_readme_kd_is_validation_s_pick_and_its_prose_is_recomputed() -> None:
    """The Δ column's KD is the KD setting with the highest mean val top-1 among those with the
    most seeds (as the study's best-of table picks), and the prose's paired differences (KD's
    temperature, QuEST − KD per seed, two levels against one, one level against FitNets) are
    what the records give."""
    hl = _headline()
    recs = hl.load(REPO / "results" / "main-job-val")
    text = " ".join((REPO / "README.md").read_text().split())
    kd = {s: hl.summary(recs, s) for s in {s for s, _ in recs if s.startswith("kd-")}}
    most = max(len(g["seeds"]) for g in kd.values())
    val = {s: g["val"][0] for s, g in kd.items() if len(g["seeds"]) == most}
    assert max(val, key=val.get) == hl.KD
    _, temp = hl.paired(recs, hl.KD, "kd-T4", "val_top1")
    assert f"paired {hl.cell(temp, signed=True)}, no measurable difference" in text
    diffs, _ = hl.paired(recs, hl.QUEST, hl.KD)
    assert all(d >= 2 for d in diffs)  # the bar: QuEST − KD ≥ 2 points on every seed
    assert "QuEST − KD is {}, {} and {} on seeds 0-2".format(
        *hl.per_seed(diffs).split(", ")) in text
    _, kd_ce = hl.paired(recs, hl.KD, "ce")
    assert f"KD − CE {hl.cell(kd_ce, signed=True)}" in text
    _, levels_val = hl.paired(recs, hl.QUEST, "q-l3-K256-w10", "val_top1")
    _, levels_test = hl.paired(recs, hl.QUEST, "q-l3-K256-w10")
    assert levels_val[0] < levels_val[1]  # the interval includes 0, as the prose says
    assert (f"paired {hl.cell(levels_val, signed=True)} over seeds 0-2: on validation the "
            f"difference is not measurable; on test {hl.cell(levels_test, signed=True)})") in text
    diffs, one_fit = hl.paired(recs, "q-l3-K256-w10", "fitnet-l3-w10")
    _, one_fit_val = hl.paired(recs, "q-l3-K256-w10", "fitnet-l3-w10", "val_top1")
    assert all(d < 0 for d in diffs)  # "on every seed"
    assert (f"by {hl.cell(one_fit, signed=True)} points on test ({hl.per_seed(diffs)}) and "
            f"{hl.cell(one_fit_val, signed=True)} on validation") in text
