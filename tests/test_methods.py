"""Methods are plug-ins: a method defined in this file alone runs through `quest student`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from quest.apps.cli import main
from quest.apps.results import load_records, method_settings, params_hash
from quest.core import methods
from quest.core.checks import check_runnable
from quest.core.distill import Distiller, FrozenTeacher
from quest.infra.config import load_config
from quest.infra.errors import QuestError

REPO = Path(__file__).resolve().parent.parent


class LogitMatch(Distiller):
    """A toy method: CE plus the squared distance to the teacher's logits, with its own trainable
    head (a learnable temperature) that is never exported."""

    name = "toy"

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.log_t = torch.nn.Parameter(torch.zeros(()))

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        t_logits = self.teacher(x).clone()  # an inference tensor: cloned before autograd saves it
        logits = self.student(x)
        match = F.mse_loss(logits * self.log_t.exp(), t_logits)
        return logits, {"ce": F.cross_entropy(logits, y), "match": 0.01 * match}


@pytest.fixture
def toy() -> Iterator[methods.MethodSpec]:
    spec = methods.register(methods.MethodSpec(
        "toy", lambda ctx: LogitMatch(ctx.student, ctx.teacher), needs_teacher=True,
        settings=("kd",), description="logit matching (a test plug-in)"))
    try:
        yield spec
    finally:
        methods.unregister("toy")


def test_builtins_are_registered_with_what_they_need() -> None:
    assert methods.names()[:8] == ("ce", "kd", "quest", "quest+kd", "fitnet", "at", "dkd", "crd")
    assert not methods.get("ce").needs_teacher
    assert methods.get("kd").settings == ("kd",) and not methods.get("kd").needs_codebook
    assert methods.get("quest+kd").settings == ("quest", "kd")
    assert methods.needs_codebook(["ce", "quest"]) and not methods.needs_codebook(["ce", "kd"])
    with pytest.raises(QuestError, match="unknown method 'qeust' \\(did you mean 'quest'\\?\\)"):
        methods.get("qeust")


@pytest.mark.slow
def test_a_method_defined_in_a_test_file_runs_through_quest_student(
        toy: methods.MethodSpec, smoke_root: Path) -> None:
    base = ["--root", str(smoke_root), "--preset", "smoke", "--set", "student.train.epochs=1"]
    assert main(["teacher", *base]) == 0
    assert main(["student", "--method", "toy", *base]) == 0
    metrics = json.loads((smoke_root / "metrics" / "students" / "toy.json").read_text())
    assert {"ce", "match", "loss"} <= set(metrics["history"][0])  # its named losses, logged
    saved = torch.load(smoke_root / "models" / "students" / "toy.pt", weights_only=True)
    assert not any("log_t" in k or "teacher" in k for k in saved["model"])  # heads not exported
    (rec,) = load_records(smoke_root / "results" / "runs")
    assert rec["method"] == "toy" and rec["teacher_sha256"] and "kd" in rec["settings"]
    # the settings it declared, and only those, enter its runs' identity
    cfg = load_config(REPO / "params.yaml", "smoke")
    assert set(method_settings(cfg, "toy")) == {"data", "student", "teacher", "kd"}
    other = load_config(REPO / "params.yaml", "smoke", ["student.quest.weight=3"])
    assert params_hash(cfg, "toy") == params_hash(other, "toy")
    # and params.yaml accepts it as a student method while it is registered
    load_config(REPO / "params.yaml", "smoke", ["student.methods=[ce, toy]"])


def test_unregistered_methods_are_one_line_errors(smoke_root: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["student", "--method", "toy", "--root", str(smoke_root), "--preset",
                 "smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'toy'" in err[0]
    # the settings load (they know no registry); the stage's start refuses the name
    cfg = load_config(REPO / "params.yaml", "smoke", ["student.methods=[toy]"])
    with pytest.raises(QuestError, match="unknown method 'toy'"):
        check_runnable(cfg)


def test_everything_method_shaped_derives_from_the_registry(toy: methods.MethodSpec) -> None:
    from quest.apps.cli import build_parser
    from quest.apps.results import history_keys
    from quest.apps.stage_table import method_params
    from quest.core.methods.kd import KDSettings

    # the registered loss terms are the record's history keys: fitnet's and at's included
    for name in methods.names():
        assert set(methods.get(name).loss_terms) <= set(history_keys()), name
    assert {"hint", "at", "dkd", "crd"} <= set(history_keys())
    # every owned section is a dvc param and a `quest config` section, with its defaults
    params = method_params(None)
    assert {"student.dkd.beta", "student.crd.nce_k", "student.at.p"} <= set(params)
    cfg = load_config(REPO / "params.yaml")
    shown = methods.config_dict(cfg)["student"]
    assert shown["kd"] == KDSettings().model_dump() and shown["crd"]["nce_k"] == 16384
    assert list(shown)[-5:] == ["kd", "fitnet", "at", "dkd", "crd"]
    # the CLI help lists every method, the toy plug-in registered here too
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    student_help = sub.choices["student"].format_help()  # type: ignore[attr-defined]
    assert all(name in student_help for name in methods.names()) and "toy" in student_help


def test_a_section_owned_twice_or_shadowing_a_field_is_refused() -> None:
    from quest.core.methods.kd import KDSettings
    from quest.infra.config import Section

    class Other(Section):
        x: int = 0

    build = methods.get("kd").build
    with pytest.raises(QuestError, match="student.kd is already defined by another method"):
        methods.register(methods.MethodSpec("kd2", build, owns={"kd": Other}))
    with pytest.raises(QuestError, match="student.train is a field"):
        methods.register(methods.MethodSpec("kd3", build, owns={"train": Other}))
    spec = methods.register(methods.MethodSpec("kd4", build, owns={"kd": KDSettings}))
    methods.unregister(spec.name)  # the same model under the same name is shared, not refused


def test_cache_keys_read_a_method_section_with_its_defaults() -> None:
    from quest.apps.stage_table import get_param
    from quest.infra.config import build_config

    cfg = build_config({"student": {"dkd": {"beta": 2.0}}})  # no crd section given at all
    assert get_param(cfg, "student.dkd.beta") == 2.0 and get_param(cfg, "student.dkd.alpha") == 1.0
    assert get_param(cfg, "student.crd.nce_k") == 16384
