"""Multi-level QuEST (student.quest.extra_levels): each level its own features, codebook and
loss term; the official transfer setting's two levels (layer3 at T = 500, the last stage at
T = 5) through the CLI on the smoke slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quest.apps.cli import main
from quest.core.checks import check_runnable
from quest.core.levels import LevelInputs, get_level, level_config, level_paths, quest_levels
from quest.core.losses import QuestLoss
from quest.core.methods.quest import Quest
from quest.core.models.taps import FeatureTap
from quest.core.models.zoo import build_model
from quest.infra.config import load_config
from quest.infra.errors import QuestError
from quest.infra.paths import Paths

REPO = Path(__file__).resolve().parents[1]
LEVEL = ("student.quest.extra_levels={l2: {teacher_layer: layer2, student_layer: layer2, "
         "temperature: 500.0, k: 16, weight: 2.0}}")


def test_levels_inherit_the_first_levels_settings() -> None:
    cfg = load_config(REPO / "params.yaml", None, [LEVEL, "features.pool=1"])
    first, l2 = quest_levels(cfg)
    assert first.name == "" and first.loss_name == "quest" and first.k == cfg.codebook.k
    assert (l2.name, l2.teacher_layer, l2.student_layer, l2.k, l2.temperature, l2.weight) == (
        "l2", "layer2", "layer2", 16, 500.0, 2.0)
    # unset values are the first level's; pooling is per level and defaults to none
    assert l2.init_scale == first.init_scale and l2.predictor == first.predictor
    assert l2.pool == 1 and l2.loss_name == "quest_l2"
    lc = level_config(cfg, "l2")
    assert (lc.features.layer, lc.codebook.k, lc.student.quest.temperature) == ("layer2", 16, 500)
    assert cfg.features.layer is None and cfg.codebook.k != 16  # the original is untouched
    lp = level_paths(Paths(Path("/p")), "l2")
    assert lp.features == Path("/p/data/levels/l2/teacher_features.npy")
    assert lp.codebook == Path("/p/models/levels/l2/codebook.npy")
    assert Paths(Path("/p")).codebook == Path("/p/models/codebook/codebook.npy")
    with pytest.raises(QuestError, match="unknown QuEST level 'l9'"):
        get_level(cfg, "l9")


@pytest.mark.parametrize("override, message", [
    ("{l2: {student_layer: layer2}}", "teacher_layer is missing"),
    ("{l2: {teacher_layer: layer9, student_layer: layer2}}", "unknown layer 'layer9'"),
    ("{'a b': {teacher_layer: layer2, student_layer: layer2}}", "letters, digits"),
    ("{l2: {teacher_layer: layer2, student_layer: layer2, k: 0}}", "k is 0: use a value greater"),
    ("{l2: {teacher_layer: layer2, student_layer: layer2, predictor: soft}}", "predictor"),
    ("[layer2]", "must be a mapping"),
])
def test_bad_levels_are_one_line_errors(override: str, message: str) -> None:
    # layer names are checked against the built networks when a stage starts, the rest on load
    with pytest.raises(QuestError, match=message) as err:
        check_runnable(load_config(REPO / "params.yaml", None,
                                   [f"student.quest.extra_levels={override}"]))
    assert "\n" not in str(err.value)


def test_each_level_adds_its_own_term_against_its_own_codebook() -> None:
    torch.manual_seed(0)
    teacher, student = build_model("resnet20", 10).eval(), build_model("resnet8", 10)
    cfg = load_config(REPO / "params.yaml", None, [LEVEL])
    l2 = get_level(cfg, "l2")
    cb3, cb2 = torch.randn(8, 64), torch.randn(16, 32)
    d = Quest(student, teacher, cb3, "layer3", "layer3", 64, temperature=5.0, weight=1.0,
              extra_levels=[LevelInputs(l2, cb2, "layer2", "layer2", 32, 1)])
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    _, losses = d.forward_train(x, y)
    assert set(losses) == {"ce", "quest", "quest_l2"}
    assert {"word_accuracy", "word_accuracy_l2", "predictor_scale_l2"} <= set(d.monitors)
    # the level's term by hand: its codebook, its temperature, its weight
    with FeatureTap(teacher, ["layer2"]) as tt, FeatureTap(student, ["layer2"]) as ts:
        teacher(x)
        student(x)
        crit = QuestLoss(cb2, 32, temperature=500.0)
        crit.predictor.load_state_dict(d.level_criteria[0].predictor.state_dict())
        ref = crit.terms(ts.outputs["layer2"], tt.outputs["layer2"])["loss"]
    torch.testing.assert_close(losses["quest_l2"], 2.0 * ref)
    # the level's predictor trains with the student
    names = {n for n, p in d.named_parameters() if p.requires_grad}
    assert any(n.startswith("level_criteria.0.predictor") for n in names)


@pytest.mark.slow
def test_two_level_quest_through_the_cli(
        smoke_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--root", str(smoke_root), "--preset", "smoke", "--set", LEVEL,
            "--set", "student.methods=[quest]", "--set", "student.train.epochs=1",
            "--set", "runtime.threads=1"]
    # the student refuses to start before the level's codebook exists, naming the commands
    assert main(["teacher", *args]) == 0
    assert main(["features", *args]) == 0
    assert main(["codebook", *args]) == 0
    capsys.readouterr()
    assert main(["student", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lp = level_paths(Paths(smoke_root), "l2")
    assert err == [f"quest: error: {lp.codebook} does not exist: run `quest features --level l2`"
                   " and `quest codebook --level l2` first"]
    assert main(["features", "--level", "l2", *args]) == 0
    assert main(["codebook", "--level", "l2", *args]) == 0
    meta = json.loads(lp.codebook_meta.read_text())
    assert meta["layer"] == "layer2" and meta["k"] == 16
    assert np.load(lp.codebook).shape == (16, 32)  # resnet56 layer2 has 32 channels
    assert np.load(lp.features).shape[1] == 32 and lp.codebook_metrics.is_file()
    # the first level's files are where they always were, fit on layer3
    assert json.loads(Paths(smoke_root).codebook_meta.read_text())["layer"] == "layer3"
    # `quest run` trains with both levels and logs both terms per epoch
    assert main(["run", *args]) == 0
    metrics = json.loads((smoke_root / "metrics" / "students" / "quest.json").read_text())
    epoch = metrics["history"][-1]
    assert epoch["quest"] > 0 and epoch["quest_l2"] > 0 and "word_accuracy_l2" in epoch


def test_unknown_level_on_the_command_line_is_a_one_line_error(
        smoke_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "--level", "nope", "--root", str(smoke_root), "--preset",
                 "smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown QuEST level 'nope'" in err[0]


@pytest.mark.slow
def test_a_study_setting_with_two_levels_shares_and_records_them(smoke_root: Path) -> None:
    from quest.apps.results import load_records

    (smoke_root / "studies").mkdir()
    (smoke_root / "README.md").write_text("# project\n")
    (smoke_root / "studies" / "lv.yaml").write_text(
        "name: lv\ndescription: one level or two\npreset: tiny\nmethods: [quest]\nseeds: [0]\n"
        "settings:\n  - name: one\n    set: {student.train.epochs: 1}\n"
        "  - name: two\n    set: {student.train.epochs: 1, student.quest.extra_levels: "
        "{l2: {teacher_layer: layer2, student_layer: layer2, k: 16, temperature: 500.0}}}\n")
    assert main(["study", str(smoke_root / "studies" / "lv.yaml"), "--root",
                 str(smoke_root)]) == 0
    recs = {r["setting"]: r for r in load_records(smoke_root / "results" / "lv")}
    assert set(recs) == {"one", "two"} and recs["one"]["params_hash"] != recs["two"]["params_hash"]
    assert "quest_l2" in recs["two"]["history"][-1] and "quest_l2" not in recs["one"]["history"][-1]
    # the level's features and codebook were built once, in the study cache
    cache = smoke_root / ".quest" / "study-cache"
    cached = list(cache.glob("codebook-level-l2-*/models/levels/l2"))
    assert len(cached) == 1 and (cached[0] / "codebook.npy").is_file()
