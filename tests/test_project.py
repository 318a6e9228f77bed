"""`quest init`: a project of one's own outside the repository. The packaged official presets
work from there, an unknown preset is one line with the closest names, a non-empty folder is
refused, and the project it writes runs: `quest run` on a small image folder with a teacher
trained in place, DVC accepts dvc.yaml and params.yaml (`dvc commit` of that run's outputs, then
`dvc status` clean), and prefect.yaml's entrypoint loads the pipeline flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from quest.apps.cli import main as quest_main
from quest.apps.project import init_project
from quest.core.methods import config_dict
from quest.infra.config import build_config, load_config, resolve_raw
from quest.infra.errors import QuestError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `quest` and `dvc`
TRAIN, TEST = 12, 4  # JPEGs per class written from the CIFAR-10 archive


def _images(archive: Path, dest: Path) -> Path:
    """An image folder dest/train/<class>/*.jpg, dest/test/<class>/*.jpg: the first TRAIN / TEST
    images of every class in the archive (10 classes)."""
    want = {"train": TRAIN, "test": TEST}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4:
                continue
            key = (parts[1], parts[2])
            if counts.get(key, 0) >= want[parts[1]]:
                if len(counts) == 20 and all(counts[k] >= want[k[0]] for k in counts):
                    break
                continue
            counts[key] = counts.get(key, 0) + 1
            out = dest / parts[1] / parts[2] / parts[3]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return dest


def _edit(params: Path, settings: dict[str, object]) -> None:
    """Set dotted keys in params.yaml, as a user editing it would."""
    raw = yaml.safe_load(params.read_text())
    for dotted, value in settings.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_init_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(QuestError) as err:
        init_project(tmp_path)
    assert "\n" not in str(err.value) and "--force" in str(err.value)
    assert not (tmp_path / "params.yaml").exists()
    init_project(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "params.yaml").is_file()


def test_init_cli_unknown_preset_is_one_line_with_did_you_mean(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert quest_main(["init", str(tmp_path / "p"), "--preset", "cifar100-resnet56-resnet2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "did you mean 'cifar100-resnet56-resnet20'" in err
    assert not (tmp_path / "p").exists()


def test_packaged_presets_work_outside_the_repository(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An official preset from a params.yaml with no presets/ beside it; the project's own
    preset of the same name wins over the packaged one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("student: {arch: resnet8}\n")
    cfg = load_config("params.yaml", "cifar100-resnet56-resnet20")
    assert (cfg.teacher.arch, cfg.codebook.k, cfg.student.arch) == ("resnet56", 4096, "resnet20")
    (tmp_path / "params.yaml").write_text(
        "presets:\n  cifar100-resnet56-resnet20: {codebook: {k: 8}}\n")
    assert load_config("params.yaml", "cifar100-resnet56-resnet20").codebook.k == 8


def test_init_with_a_preset_writes_its_active_configuration(tmp_path: Path) -> None:
    name = "mit67-resnet34-vgg9-img10"
    init_project(tmp_path, name)
    text = (tmp_path / "params.yaml").read_text()
    assert len(text.splitlines()) < 150  # readable, not a dump of every preset
    assert text.count("# FILL IN:") == 2  # data.location and teacher.checkpoint
    got = load_config(tmp_path / "params.yaml")
    # every setting (the methods' sections filled in) as the preset makes it
    assert config_dict(got) == config_dict(build_config(resolve_raw({}, name)))
    assert got.student.quest.extra_levels  # the preset's second level came along


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUEST_DATA_LOCATION", "QUEST_TEACHER_CHECKPOINT", "QUEST_PRESET")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO),  # this checkout's quest and flows, not another install
        "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "true", "DO_NOT_TRACK": "true",
        "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
        "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp), "DVC_PAGER": "cat",
    })
    return env


def _run(*args: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out}"
    return out


def test_a_project_of_ones_own_runs(tmp_path: Path, cifar_archive: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """quest init in an empty folder outside the repository, params.yaml edited to a small
    image folder and a teacher trained in place (the tiny slice), then quest run there."""
    for key in ("QUEST_DATA_LOCATION", "QUEST_TEACHER_CHECKPOINT", "QUEST_PRESET", "QUEST_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    root = tmp_path / "myproject"
    assert REPO not in root.parents
    assert quest_main(["init", str(root)]) == 0
    assert {p.name for p in root.iterdir()} >= {"params.yaml", "dvc.yaml", "prefect.yaml",
                                               ".gitignore", ".dvcignore", "README.md"}
    _images(cifar_archive, root / "images")
    _edit(root / "params.yaml", {
        "data.location": "images", "data.validation_per_class": 2,
        "teacher.arch": "resnet8", "teacher.checkpoint": None,
        "teacher.train": {**yaml.safe_load((root / "params.yaml").read_text())["teacher"]["train"],
                          "epochs": 1, "batch_size": 50, "schedule": "onecycle"},
        # the tiny slice's settings
        "features.max_vectors": None, "features.batch_size": 100,
        "codebook.k": 32, "codebook.iterations": 5,
        "student.arch": "resnet8", "student.methods": ["ce", "quest"],
        "student.train.epochs": 1, "student.train.batch_size": 50,
        "runtime.progress": "lines", "runtime.threads": 1,
        "validation.predictions.min_top1_over_chance": 0.0,
    })
    monkeypatch.chdir(root)
    assert quest_main(["run"]) == 0
    evaluation = json.loads((root / "metrics" / "evaluation.json").read_text())
    assert set(evaluation["models"]) == {"teacher", "ce", "quest"}
    # the images it read are the folder's: 10 classes x (TEST test, 2 validation)
    assert (evaluation["num_test_images"], evaluation["num_val_images"]) == (10 * TEST, 20)
    assert (root / "models" / "teacher").is_dir()

    # DVC reads the same files: committing the run's outputs leaves the pipeline up to date,
    # which needs every dep, out and param dvc.yaml names to exist where quest run put them
    env = _env(tmp_path)
    _run("git", "init", "-q", cwd=root, env=env)
    _run(str(BIN / "dvc"), "init", "-q", cwd=root, env=env)
    stages = _run(str(BIN / "dvc"), "stage", "list", cwd=root, env=env)
    assert "student@quest" in stages and "student@ce" in stages
    _run(str(BIN / "dvc"), "commit", "-f", "-q", cwd=root, env=env)
    status = _run(str(BIN / "dvc"), "status", cwd=root, env=env)
    assert "up to date" in status, status
    # an edit reruns only the stages that read the key
    _edit(root / "params.yaml", {"student.train.lr": 0.02})
    status = _run(str(BIN / "dvc"), "status", cwd=root, env=env)
    changed = {line.rstrip(":") for line in status.splitlines() if line and line[0] != "\t"}
    assert changed == {"student@ce", "student@quest"}, status

    # prefect.yaml's deployment loads the pipeline flow from this folder
    from prefect.flows import load_flow_from_entrypoint

    deployment = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"][0]
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert flow.name == "quest-pipeline"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
