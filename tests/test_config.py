"""The typed settings (quest/infra/config.py): pydantic models, one-line errors naming the key
and the fix, choices as Literal types, and the checks that wait for a stage's start."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from quest.core.checks import check_runnable
from quest.core.fastpath import AMP_MODES
from quest.core.losses import PREDICTORS
from quest.infra.config import Config, Predictor, build_config, load_config
from quest.infra.errors import QuestError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw, message", [
    ({"student": {"train": {"epoch": 3}}},
     "unknown setting 'student.train.epoch' (did you mean 'student.train.epochs'?): remove or "
     "rename it in params.yaml"),
    ({"sudent": {}}, "unknown setting 'sudent' (did you mean 'student'?)"),
    ({"student": {"train": {"epochs": "six"}}},
     "student.train.epochs must be int, got 'six': fix it in params.yaml"),
    ({"student": {"train": {"epochs": True}}}, "student.train.epochs must be int, got True"),
    ({"student": {"train": {"nesterov": 1}}}, "student.train.nesterov must be bool, got 1"),
    ({"student": {"train": {"schedule": "linear"}}},
     "student.train.schedule is 'linear': choose one of step, cosine, onecycle"),
    ({"student": {"quest": {"predictor": "cosine"}}},
     "student.quest.predictor is 'cosine': choose one of learned_scale, fixed_scale_bias"),
    ({"student": {"quest": {"extra_levels": {"l2": {"teacher_layer": "layer2", "kk": 3}}}}},
     "unknown setting 'student.quest.extra_levels.l2.kk' (did you mean "
     "'student.quest.extra_levels.l2.k'?)"),
    ({"data": {"mean": [0.5, "a", 0.5]}}, "data.mean[1] must be float, got 'a'"),
    ({"data": {"channels": 2}}, "data.channels is '2': choose one of 1, 3"),
    ({"codebook": 5}, "codebook must be a mapping, got 5"),
    ({"student": {"methods": "quest"}}, "student.methods must be list of str, got 'quest'"),
    ({"codebook": {"k": 0}}, "codebook.k is 0: use a value greater than 0"),
])
def test_bad_values_are_one_line_errors_naming_key_and_fix(raw: dict, message: str) -> None:
    with pytest.raises(QuestError) as err:
        build_config(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def _ranged_keys() -> list[tuple[str, str, float]]:
    """(dotted key, bound, value) of every range the settings declare (Field(gt=..., le=...)),
    a mapping's sections under the level name l2; the method sections are checked elsewhere."""
    from quest.apps.config_doc import field_bounds, schema_keys
    from quest.core.methods import sections

    method_sections = [["student", m] for m in dict(sections())]
    return [(key.replace(".NAME.", ".l2."), bound, value)
            for key, field, _ in schema_keys() if key.split(".")[:2] not in method_sections
            for bound, value in field_bounds(field)]


def _nested(key: str, value: object) -> dict:
    """Raw settings holding one dotted key (an extra level gets its two layers too)."""
    raw: dict = {}
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    if ".extra_levels." in key:
        node.update(teacher_layer="layer2", student_layer="layer2")
    return raw


def test_every_declared_range_refuses_the_value_just_outside_it_in_one_line() -> None:
    """A value outside a field's range (a share of 50 meant as 50 %, a K of 0) is refused before
    any work, in one line naming the key, the value and the bound."""
    ranged = _ranged_keys()
    assert {"codebook.k", "validation.data.min_class_share", "report.gallery_words",
            "student.quest.extra_levels.l2.weight",
            "promotion.min_top1"} <= {k for k, _, _ in ranged}
    for key, bound, limit in ranged:
        outside = limit - 1 if bound in ("gt", "ge") else limit + 1
        with pytest.raises(QuestError) as err:
            build_config(_nested(key, outside))
        msg = str(err.value)
        assert msg.startswith(f"{key} is {outside}: use a value") and "\n" not in msg, msg


def test_types_are_kept_and_an_int_is_a_float_where_a_float_is_expected() -> None:
    cfg = build_config({"student": {"train": {"lr": 1}, "kd": {"temperature": 2}},
                        "features": {"max_vectors": None}})
    assert cfg.student.train.lr == 1.0 and isinstance(cfg.student.train.lr, float)
    assert cfg.student.model_extra == {"kd": {"temperature": 2}}  # a method section, kept raw
    assert cfg.to_dict() == build_config(cfg.to_dict()).to_dict()  # round trip
    assert Config().to_dict() == build_config({}).to_dict()


def test_the_choices_of_the_core_come_from_the_settings_types() -> None:
    assert PREDICTORS == typing.get_args(Predictor) == ("learned_scale", "fixed_scale_bias")
    assert AMP_MODES == ("fp32", "bf16")


def test_names_only_the_core_knows_are_checked_when_a_stage_starts() -> None:
    # loading builds no network: an unknown layer or architecture passes the load ...
    layer = load_config(REPO / "params.yaml", None, ["features.layer=layer9"])
    arch = load_config(REPO / "params.yaml", None, ["student.arch=resnet21"])
    # ... and stops the stage, before anything runs, with one line
    with pytest.raises(QuestError, match=r"features.layer: unknown layer 'layer9'"):
        check_runnable(layer)
    with pytest.raises(QuestError, match=r"student.arch is 'resnet21': choose one of"):
        check_runnable(arch)
    check_runnable(load_config(REPO / "params.yaml"))  # the main job passes


def test_a_preset_replaces_the_quantized_levels_whole() -> None:
    """The main job's layer2 level (params.yaml) never leaks into a preset that names its own
    levels: `{}` gives one level, a transfer preset's layer3 replaces it; a preset silent on
    levels keeps the base's."""
    from quest.infra.config import PRESET_REPLACES, deep_merge

    def apply_preset(base: dict, preset: dict) -> dict:
        return deep_merge(base, preset, PRESET_REPLACES)

    base = {"student": {"quest": {"weight": 10.0, "extra_levels": {"l2": {"k": 8}}}}}
    one = apply_preset(base, {"student": {"quest": {"extra_levels": {}, "weight": 1.0}}})
    assert one["student"]["quest"] == {"weight": 1.0, "extra_levels": {}}
    other = apply_preset(base, {"student": {"quest": {"extra_levels": {"l3": {"k": 4}}}}})
    assert other["student"]["quest"]["extra_levels"] == {"l3": {"k": 4}}
    silent = apply_preset(base, {"codebook": {"k": 16}})
    assert silent["student"]["quest"]["extra_levels"] == {"l2": {"k": 8}}
    assert base["student"]["quest"]["extra_levels"] == {"l2": {"k": 8}}  # the base is untouched
    # the repository's own: two levels for the main job, one for every preset named here
    main_job = load_config(REPO / "params.yaml")
    assert list(main_job.student.quest.extra_levels) == ["l2"]
    for preset in ("smoke", "tiny", "stream-tiny", "cifar10-full", "cifar100"):
        assert load_config(REPO / "params.yaml", preset).student.quest.extra_levels == {}, preset
