"""MLflow tracking, registry and gated promotion against a real SQLite store in a temporary root."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_http_ok

from quest.apps.cli import main
from quest.infra.errors import QuestError

pytestmark = pytest.mark.slow  # make test-fast leaves it out; make test runs it

REPO = Path(__file__).resolve().parents[1]
QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# the tiny preset (1 student epoch), with 10 test images per class: 100 for the teacher check
OVERRIDES = ["data.subset.test_per_class=10"]
EPOCHS = 1
METHODS = ["ce", "kd", "quest"]


@pytest.fixture(scope="module")
def tracked(
    tmp_path_factory: pytest.TempPathFactory, cifar_archive: Path, teacher_checkpoint: Path
) -> Iterator[dict[str, Any]]:
    """The tiny chain run once, then `quest track` into a fresh SQLite store (all in tmp)."""
    from quest.apps.pipeline import run_pipeline
    from quest.infra.config import load_config
    from quest.infra.paths import Paths

    root = tmp_path_factory.mktemp("mlflow-root")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in QUIET.items():
            mp.setenv(key, value)
        mp.setenv("QUEST_DATA_LOCATION", str(cifar_archive))
        mp.setenv("QUEST_TEACHER_CHECKPOINT", str(teacher_checkpoint))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # anything written relative to the working directory stays in tmp
        cfg = load_config(root / "params.yaml", "tiny", OVERRIDES)
        from quest.apps.validation import pipeline_checks

        # with the Great Expectations suites, as `quest run` runs it: their reports get logged
        run_pipeline(cfg, Paths(root), pipeline_checks(cfg, Paths(root)))
        sets = [a for o in OVERRIDES for a in ("--set", o)]
        assert main(["track", "--root", str(root), "--preset", "tiny", *sets,
                     "--tracking-uri", uri]) == 0
        run = json.loads((root / "metrics" / "mlflow_run.json").read_text())
        yield {"root": root, "uri": uri, "run": run, "cfg": cfg}


@pytest.fixture(scope="module")
def client(tracked: dict[str, Any]) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracked["uri"], registry_uri=tracked["uri"])


def _metrics(root: Path, name: str) -> Any:
    return json.loads((root / "metrics" / name).read_text())


def test_parent_run_with_a_child_run_per_stage(tracked: dict[str, Any], client: Any) -> None:
    run = tracked["run"]
    assert run["tracking_uri"] == tracked["uri"]
    parent = client.get_run(run["parent_run_id"])
    # artifacts live beside the database, not in the working directory's ./mlruns
    location = client.get_experiment(run["experiment_id"]).artifact_location
    assert location == (tracked["root"] / "mlruns" / "quest").resolve().as_uri()
    assert parent.info.status == "FINISHED"
    # params: the flattened config with dotted keys
    assert parent.data.params["student.train.epochs"] == str(EPOCHS)
    assert parent.data.params["codebook.k"] == "32"
    assert parent.data.params["student.methods"] == str(METHODS)
    assert parent.data.metrics["teacher.top1"] > 0.7
    children = client.search_runs(
        [run["experiment_id"]], f"tags.mlflow.parentRunId = '{run['parent_run_id']}'"
    )
    names = {c.info.run_name: c for c in children}
    expected = {"teacher", "codebook", "evaluate", *(f"student[{m}]" for m in METHODS)}
    assert set(names) == expected
    assert {n: c.info.run_id for n, c in names.items()} == run["child_run_ids"]
    for name, child in names.items():
        assert child.info.status == "FINISHED"
        assert child.data.tags["quest.stage"] == name
    assert names["student[kd]"].data.tags["quest.method"] == "kd"
    assert names["student[kd]"].data.params["method"] == "kd"
    ev = names["evaluate"].data.metrics
    evaluation = _metrics(tracked["root"], "evaluation.json")["models"]
    for model in ("teacher", *METHODS):
        assert ev[f"{model}.top1"] == pytest.approx(evaluation[model]["top1"])
        assert ev[f"{model}.params"] == evaluation[model]["params"]
        assert ev[f"{model}.macs"] > 0


def test_per_epoch_history_one_entry_per_epoch(tracked: dict[str, Any], client: Any) -> None:
    ids = tracked["run"]["child_run_ids"]
    root = tracked["root"]
    named = {
        "ce": ["ce"],
        "kd": ["ce", "kd"],
        "quest": ["ce", "quest", "word_accuracy", "teacher_perplexity", "mean_max_assignment"],
    }
    for method, losses in named.items():
        history = _metrics(root, f"students/{method}.json")["history"]
        for key in ["loss", "lr", "train_accuracy", "test_accuracy", *losses]:
            logged = client.get_metric_history(ids[f"student[{method}]"], key)
            assert sorted(m.step for m in logged) == list(range(1, EPOCHS + 1)), key
            by_step = {m.step: m.value for m in logged}
            for record in history:
                assert by_step[record["epoch"]] == pytest.approx(record[key]), (method, key)
    cb = client.get_run(ids["codebook"])
    codebook = _metrics(root, "codebook.json")
    assert cb.data.metrics["perplexity"] == pytest.approx(codebook["perplexity"])
    objective = client.get_metric_history(ids["codebook"], "objective")
    assert sorted(m.step for m in objective) == [1, 2, 3, 4, 5]  # codebook.iterations: 5
    values = [m.value for m in sorted(objective, key=lambda m: m.step)]
    assert values[-1] <= values[0]  # k-means never gets worse


def test_artifacts_logged(tracked: dict[str, Any], client: Any) -> None:
    pid = tracked["run"]["parent_run_id"]

    def names(path: str) -> set[str]:
        return {Path(a.path).name for a in client.list_artifacts(pid, path)}

    assert {"evaluation.json", "teacher.json", "codebook.json", "per_class.json"} <= names(
        "metrics")
    assert "mlflow_run.json" not in names("metrics")  # written after the run, as a DVC out
    assert names("metrics/students") == {f"{m}.json" for m in METHODS}
    assert {"codebook_objective.csv", "codebook_usage.csv"} <= names("plots")
    assert names("plots/students") == {f"{m}.csv" for m in METHODS}
    assert names("models/codebook") == {"codebook.json"}
    sid = tracked["run"]["child_run_ids"]["student[quest]"]
    assert {Path(a.path).name for a in client.list_artifacts(sid, "students/quest")} == {
        "quest.json", "quest.csv"}


def test_validation_reports_and_counts_logged(tracked: dict[str, Any], client: Any) -> None:
    pid = tracked["run"]["parent_run_id"]
    names = {Path(a.path).name for a in client.list_artifacts(pid, "reports/validation")}
    suites = ("data", "features", "codebook", "predictions")
    assert {f"{s}.json" for s in suites} <= names
    docs = {Path(a.path).name for a in client.list_artifacts(pid, "reports/validation/docs/data")}
    assert "index.html" in docs
    metrics = client.get_run(pid).data.metrics
    for suite in suites:
        report = json.loads((tracked["root"] / "reports" / "validation" / f"{suite}.json")
                            .read_text())
        assert metrics[f"validation.{suite}.passed"] == report["passed"] > 0
        assert metrics[f"validation.{suite}.failed"] == 0
        assert metrics[f"validation.{suite}.success"] == 1.0


def test_models_registered_with_provenance_tags(tracked: dict[str, Any], client: Any) -> None:
    from quest.infra.io_utils import file_sha256

    run, root = tracked["run"], tracked["root"]
    evaluation = _metrics(root, "evaluation.json")["models"]
    codebook_sha = json.loads((root / "models/codebook/codebook.json").read_text())[
        "codebook_sha256"]
    teacher = client.get_model_version("quest-teacher", str(run["teacher_version"]))
    assert teacher.tags["arch"] == "resnet56"
    assert float(teacher.tags["test_top1"]) == pytest.approx(evaluation["teacher"]["top1"])
    assert float(teacher.tags["val_top1"]) == pytest.approx(evaluation["teacher"]["val_top1"])
    assert teacher.run_id == run["child_run_ids"]["teacher"]
    assert set(run["student_versions"]) == set(METHODS)
    for method, version in run["student_versions"].items():
        mv = client.get_model_version("quest-student", str(version))
        sm = _metrics(root, f"students/{method}.json")
        assert mv.run_id == run["child_run_ids"][f"student[{method}]"]
        assert mv.tags["method"] == method
        assert mv.tags["arch"] == "resnet20"
        assert mv.tags["teacher_version"] == str(run["teacher_version"])
        assert mv.tags["codebook_sha256"] == codebook_sha
        assert mv.tags["data_sha256"] == sm["data_sha256"] == teacher.tags["data_sha256"]
        assert mv.tags["git_commit"] == "unknown"  # the tmp root is not a git repository
        assert float(mv.tags["test_top1"]) == pytest.approx(evaluation[method]["top1"])
        assert float(mv.tags["val_top1"]) == pytest.approx(evaluation[method]["val_top1"])
        assert mv.tags["model_sha256"] == file_sha256(root / f"models/students/{method}.pt")
    # every logged model carries explicit pins and its own copy of the quest package
    logged = sorted((root / "mlruns" / "quest" / "models").glob("m-*/artifacts"))
    assert len(logged) == 1 + len(METHODS)
    for model_dir in logged:
        reqs = (model_dir / "requirements.txt").read_text().split()
        assert {"torch==2.14.1", "torchvision==0.29.1", "numpy==2.4.6"} <= set(reqs)
        assert (model_dir / "code" / "quest" / "core" / "checkpoint.py").is_file()
        assert (model_dir / "input_example.json").is_file()
    # the challenger is the best on validation (the first listed wins a tie), not on test
    best = max(METHODS, key=lambda m: evaluation[m]["val_top1"])
    challenger = client.get_model_version_by_alias("quest-student", "challenger")
    assert int(challenger.version) == run["challenger"]["version"]
    assert run["challenger"]["method"] == best
    assert float(challenger.tags["val_top1"]) == pytest.approx(evaluation[best]["val_top1"])


def test_git_commit_of_a_repository() -> None:
    from quest.apps.results import git_commit

    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit(REPO) or "")


def _candidate(client: Any, source: Any, top1: float) -> int:
    """Register one more version of an existing model with a chosen val_top1 tag."""
    tags = {**source.tags, "val_top1": str(top1)}
    mv = client.create_model_version("quest-student", source.source, run_id=source.run_id,
                                     tags=tags)
    return int(mv.version)


@pytest.fixture(scope="module")
def gated(tracked: dict[str, Any], client: Any) -> dict[str, Any]:
    """The promotion sequence, run once: first champion, worse, below the bar, better."""
    from quest.apps.tracking import promote

    uri = tracked["uri"]
    steps: dict[str, Any] = {"first": promote(uri)}
    champion = client.get_model_version_by_alias("quest-student", "champion")
    top1 = float(champion.tags["val_top1"])
    worse = _candidate(client, champion, top1 - 0.05)
    steps["worse"] = promote(uri, version=worse)
    steps["after_worse"] = int(client.get_model_version_by_alias("quest-student",
                                                                 "champion").version)
    better = _candidate(client, champion, top1 + 0.5)
    steps["below_bar"] = promote(uri, min_top1=top1 + 0.6, version=better)
    steps["after_below_bar"] = int(client.get_model_version_by_alias("quest-student",
                                                                     "champion").version)
    steps.update(champion=int(champion.version), top1=top1, worse_version=worse,
                 better_version=better)
    return steps


def test_promotion_gate(
    tracked: dict[str, Any], client: Any, gated: dict[str, Any],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from quest.apps.tracking import promote

    first, champion = gated["first"], gated["champion"]
    assert first["promoted"] is True and first["previous_champion"] is None
    assert first["version"] == champion == tracked["run"]["challenger"]["version"]
    worse = gated["worse"]
    assert worse["promoted"] is False and worse["version"] == gated["worse_version"]
    assert "does not beat" in worse["reason"] and worse["previous_champion"] == champion
    assert gated["after_worse"] == champion  # registry unchanged
    below = gated["below_bar"]
    assert below["promoted"] is False and "below min_top1" in below["reason"]
    assert gated["after_below_bar"] == champion
    # the better candidate through the CLI, which prints one line
    root, uri = tracked["root"], tracked["uri"]
    better = gated["better_version"]
    assert main(["promote", "--root", str(root), "--preset", "tiny", "--tracking-uri", uri,
                 "--version", str(better)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("promoted: ") and "\n" not in out
    now = client.get_model_version_by_alias("quest-student", "champion")
    assert int(now.version) == better
    assert now.tags["promoted_from"] == str(champion)
    # promote leaves the caller's MLflow settings alone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///somewhere-else.db")
    again = promote(uri, version=better)
    assert again["promoted"] is False and "already the champion" in again["reason"]
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///somewhere-else.db"
    # the default candidate is the challenger; it no longer beats the new champion
    assert main(["promote", "--root", str(root), "--preset", "tiny", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.startswith("not promoted: ")
    assert main(["promote", "--root", str(root), "--preset", "tiny", "--tracking-uri", uri,
                 "--model-name", "no-such-model"]) == 2
    assert "run `quest track` first" in capsys.readouterr().err


FRESH = r"""
import importlib.util, json, sys
import numpy as np
# simulate a machine without quest installed: drop the editable-install finder
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
assert importlib.util.find_spec("quest") is None, "quest must not be importable here"
import mlflow.pyfunc
prepared, teacher_version = sys.argv[1], sys.argv[2]
images = np.load(prepared + "/test_images.npy")[:100].transpose(0, 2, 3, 1).copy()
labels = np.load(prepared + "/test_labels.npy")[:100]
student = mlflow.pyfunc.load_model("models:/quest-student@champion")
probs = student.predict(images[:8])
import quest
teacher = mlflow.pyfunc.load_model(f"models:/quest-teacher/{teacher_version}")
tp = teacher.predict(images)
print(json.dumps({
    "shape": list(probs.shape), "dtype": str(probs.dtype), "row_sums": probs.sum(1).tolist(),
    "min": float(probs.min()), "quest_file": quest.__file__, "n": int(len(labels)),
    "teacher_acc": float((tp.argmax(1) == labels).mean()),
}))
"""


def test_champion_loads_and_predicts_in_a_fresh_process(
    tracked: dict[str, Any], gated: dict[str, Any], tmp_path: Path
) -> None:
    root = tracked["root"]
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": tracked["uri"]}
    env.pop("PYTHONPATH", None)
    res = subprocess.run(
        [sys.executable, "-c", FRESH, str(root / "data" / "prepared"),
         str(tracked["run"]["teacher_version"])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["shape"] == [8, 10] and out["dtype"] == "float32"
    assert out["min"] >= 0 and all(abs(s - 1) < 1e-4 for s in out["row_sums"])
    # quest came with the model (code_paths), not from the repository or an installed copy
    assert str(REPO) not in out["quest_file"] and "/code/quest/" in out["quest_file"]
    assert out["n"] == 100 and out["teacher_acc"] > 0.7


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quest.apps.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(tmp_path, "sqlite:///x.db") == "sqlite:///x.db"


def test_promote_without_a_database_names_the_fix(tmp_path: Path) -> None:
    from quest.apps.tracking import promote

    with pytest.raises(QuestError, match="run `quest track` first"):
        promote(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()  # no empty store left behind


def test_track_before_the_pipeline_names_the_fix(tmp_path: Path) -> None:
    from quest.apps.tracking import track_pipeline
    from quest.infra.config import load_config
    from quest.infra.paths import Paths

    cfg = load_config(REPO / "params.yaml", "tiny")
    with pytest.raises(QuestError, match="run `quest teacher` first"):
        track_pipeline(cfg, Paths(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command,option", [("track", "--tracking-uri"),
                                            ("promote", "--min-top1")])
def test_cli_help(command: str, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert option in capsys.readouterr().out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _encoded_variants() -> list[str]:
    """Images people send: a large CMYK JPEG, an RGBA PNG, a 16-bit greyscale PNG, a GIF."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    out = []
    for img, fmt in ((rgb.convert("CMYK"), "JPEG"), (rgb.convert("RGBA"), "PNG"),
                     (Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)), "PNG"),
                     (rgb.resize((8, 8)).convert("P"), "GIF")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def test_make_serve_answers_like_the_pyfunc_and_rejects_malformed_bodies(
    tracked: dict[str, Any], gated: dict[str, Any]
) -> None:
    """`make serve` (python -m flows.local_servers model --workers 2): the registry's champion over
    HTTP on 127.0.0.1, started without an activated venv (the venv's bin is not on PATH).
    Encoded images and uint8 tensors in, class names with probabilities out; a malformed body
    gets a 400 naming the expected input."""
    import urllib.error
    import urllib.request

    import mlflow.pyfunc
    import numpy as np

    from quest.apps.tracking.server import encode_images

    root, port = tracked["root"], _free_port()
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p != venv_bin)
    env = {**os.environ, **QUIET, "PATH": path, "MLFLOW_TRACKING_URI": tracked["uri"]}
    proc = subprocess.Popen([sys.executable, "-m", "flows.local_servers", "model",
                             "--root", str(root),
                             "--port", str(port), "--workers", "2"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/ping", proc, 180, "the model server (make serve)")
        images = np.load(root / "data" / "prepared" / "test_images.npy")[:6]
        images = images.transpose(0, 2, 3, 1).copy()  # N x H x W x C uint8, as users send them
        classes = json.loads((root / "data" / "prepared" / "meta.json").read_text())["classes"]

        def post(body: Any) -> tuple[int, Any]:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            req = urllib.request.Request(f"{base}/invocations", data=data,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode()

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
            local = mlflow.pyfunc.load_model("models:/quest-student@champion").predict(images)
        status, answer = post({"inputs": images.tolist()})
        assert status == 200, answer
        served = np.asarray(answer["probabilities"], dtype=np.float32)
        assert served.shape == (6, 10)
        np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-5)
        # the same images as PNG files: the same answer, as class names with probabilities
        status, answer = post({"images": encode_images(images), "top_k": 3})
        assert status == 200, answer
        for row, top in zip(local, answer["predictions"], strict=True):
            assert len(top) == 3
            assert top[0]["class"] == classes[int(row.argmax())]
            assert top[0]["probability"] == pytest.approx(float(row.max()), abs=1e-5)
            assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
        status, answer = post({"images": _encoded_variants()})
        assert status == 200, answer
        assert [len(t) for t in answer["predictions"]] == [5] * 4
        assert all(t[0]["class"] in classes for t in answer["predictions"])
        h, w = images.shape[1:3]
        bad_bodies = {
            "not json": b"{not json",
            "wrong key": {"wrong_key": [1, 2]},
            "not images": {"inputs": [1, 2, 3]},
            "float pixels": {"inputs": (images[:1] / 255.0).tolist()},
            "one channel": {"inputs": images[:1, :, :, :1].tolist()},
            "wrong size": {"inputs": np.zeros((1, h + 1, w, 3), np.uint8).tolist()},
            "bad base64": {"images": ["not base64!!"]},
            "not an image": {"images": [base64.b64encode(b"hello").decode()]},
            "bad top_k": {"images": encode_images(images[:1]), "top_k": 0},
        }
        for name, bad in bad_bodies.items():
            status, text = post(bad)
            assert status == 400, (name, status, text)
            assert "expected" in text, (name, text)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
