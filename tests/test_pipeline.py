"""The whole chain on the smoke preset through the CLI, and the CLI's error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quest.apps.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(root: Path, *args: str) -> int:
    return main([*args[:1], "--root", str(root), "--preset", "smoke", *args[1:]])


@pytest.mark.slow
def test_smoke_chain_end_to_end(smoke_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare is covered by the session fixture; run the remaining stages through the CLI.
    # One student epoch: the chain's plumbing is what is checked here (the resume and study
    # tests train several epochs); it halves the test's CPU time
    for stage in ("teacher", "features", "codebook", "student", "evaluate"):
        assert run_cli(smoke_root, stage, "--set", "student.train.epochs=1") == 0, stage
    out = capsys.readouterr().out
    for name in ("teacher", "ce", "kd", "quest", "quest+kd"):
        assert name in out
    ev = json.loads((smoke_root / "metrics" / "evaluation.json").read_text())
    assert set(ev["models"]) == {"teacher", "ce", "kd", "quest", "quest+kd"}
    assert ev["models"]["teacher"]["top1"] > 0.7
    assert ev["models"]["ce"]["params"] == 272_474
    assert ev["models"]["ce"]["macs"] > 40_000_000
    # the smoke preset's validation split: every model evaluated on it beside test, and the
    # printed table shows it (choices read it)
    assert ev["num_val_images"] == 50 and "val top-1" in out
    assert all(0 <= m["val_top1"] <= m["val_top5"] <= 1 for m in ev["models"].values())
    feats = np.load(smoke_root / "data" / "features" / "teacher_features.npy", mmap_mode="r")
    meta = json.loads((smoke_root / "data" / "features" / "teacher_features.json").read_text())
    assert feats.shape == (300 * 64, 64) and meta["map_shape"] == [64, 8, 8]
    assert meta["layer"] == "layer3" and feats.min() >= 0  # post-ReLU
    cb = np.load(smoke_root / "models" / "codebook" / "codebook.npy")
    assert cb.shape == (64, 64)
    quest = json.loads((smoke_root / "metrics" / "students" / "quest.json").read_text())
    last = quest["history"][-1]
    for key in ("ce", "quest", "loss", "lr", "train_accuracy", "test_accuracy",
                "word_accuracy", "teacher_perplexity", "mean_max_assignment"):
        assert key in last, key
    assert 0 < last["teacher_perplexity"] <= 64
    curve = (smoke_root / "plots" / "students" / "quest+kd.csv").read_text().splitlines()
    assert curve[0].startswith("epoch") and "kd" in curve[0] and len(curve) == 2
    # the exported student is the plain architecture: no predictor weights inside
    import torch

    saved = torch.load(smoke_root / "models" / "students" / "quest.pt", weights_only=True)
    assert not any("predictor" in k for k in saved["model"])
    per_class = json.loads((smoke_root / "metrics" / "per_class.json").read_text())
    assert len(per_class["ce"]) == 10


@pytest.mark.slow
def test_codebook_larger_than_data_is_one_line_error(smoke_root: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(smoke_root, "teacher") == 0
    assert run_cli(smoke_root, "features", "--set", "features.max_vectors=50") == 0
    assert run_cli(smoke_root, "codebook") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("quest: error: codebook size K=64 is larger than the 50")
    assert not (smoke_root / "models" / "codebook" / "codebook.npy").exists()


@pytest.mark.slow
def test_bad_settings_are_one_line_errors(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    cases = {
        ("--set", "teacher.arch=resnet21"): "teacher.arch is 'resnet21'",
        ("--set", "student.train.epoch=3"): "did you mean 'student.train.epochs'",
        ("--set", "features.layer=layer9"): "unknown layer 'layer9'",
        ("--preset", "nope"): "unknown preset 'nope'",
    }
    # the first case through a real `python -m quest` process (exit status and stderr at the
    # process boundary); the others through the same entry point in this process (each process
    # start costs seconds of imports and checks nothing more)
    for i, (args, expected) in enumerate(cases.items()):
        argv = ["config", "--root", str(tmp_path), *args]
        if i == 0:
            proc = subprocess.run([sys.executable, "-m", "quest", *argv],
                                  capture_output=True, text=True, check=False)
            rc, err = proc.returncode, proc.stderr
        else:
            rc, err = main(argv), capsys.readouterr().err
        assert rc == 2, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], err


@pytest.mark.slow
def test_missing_data_path_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "quest", "prepare", "--root", str(tmp_path),
         "--set", f"data.location={tmp_path / 'nowhere.tar.gz'}"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


@pytest.mark.slow
def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "quest", "--help"], capture_output=True,
                          text=True, check=True)
    for cmd in ("prepare", "teacher", "features", "codebook", "student", "evaluate", "run",
                "models", "config", "init"):
        assert cmd in proc.stdout
    # the subcommands' help in this process (the process boundary is checked just above)
    for cmd in ("prepare", "student", "models"):
        with pytest.raises(SystemExit) as done:
            main([cmd, "--help"])
        assert done.value.code == 0
        assert "usage: quest" in capsys.readouterr().out


def test_a_command_parses_without_importing_the_core() -> None:
    """Only the named command's arguments are built: `quest track ...` (or any command that
    does not train) starts without torch, which the method listing of `quest student`'s help
    would import (~2 CPU-s in every DVC stage process); the full parser still lists every
    method."""
    code = ("import sys; from quest.apps.cli import COMMANDS, _named_command, build_parser; "
            "assert _named_command(['--debug', 'track', '--root', '.']) == 'track'; "
            "assert _named_command(['--help']) is None; "
            "args = build_parser('track').parse_args(['track', '--root', 'x']); "
            "assert args.command == 'track' and args.root == 'x', args; "
            "assert 'torch' not in sys.modules, 'the track parser imported torch'; "
            "build_parser(); assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


@pytest.mark.slow
def test_models_listing_shows_counts_and_layers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for count in ("278,324", "861,620", "1,233,540", "7,433,860", "703,284", "2,255,156"):
        assert count in out
    assert main(["models", "--layers", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "* layer3" in out and "64x8x8" in out


@pytest.mark.slow
def test_concurrent_runs_on_one_project_refuse_with_one_line(tmp_path: Path) -> None:
    from quest.infra.runlock import run_lock

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    cmd = [sys.executable, "-m", "quest", "features", "--root", str(tmp_path)]
    with run_lock(tmp_path, "a test holding the lock"):
        busy = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert busy.returncode == 2
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1 and "another quest run is using" in lines[0]
    assert "a test holding the lock" in lines[0]
    # once released, the command gets past the lock (and fails on what is really missing)
    free = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert free.returncode == 2 and "run `quest prepare` first" in free.stderr


def test_lock_of_a_killed_run_does_not_block_the_next(tmp_path: Path) -> None:
    import signal
    import time

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from quest.infra.runlock import run_lock\n"
         f"with run_lock({str(tmp_path)!r}, 'doomed'):\n"
         "    print('locked', flush=True); time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    from quest.infra.errors import QuestError
    from quest.infra.runlock import run_lock

    with pytest.raises(QuestError, match="doomed"), run_lock(tmp_path, "second"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    time.sleep(0.1)
    with run_lock(tmp_path, "after the kill"):
        assert "after the kill" in (tmp_path / ".quest" / "run.lock").read_text()


@pytest.mark.slow
def test_sigterm_stops_training_cleanly_and_the_rerun_resumes(smoke_root: Path) -> None:
    import signal
    import time

    assert run_cli(smoke_root, "teacher") == 0
    cmd = [sys.executable, "-m", "quest", "student", "--root", str(smoke_root), "--preset",
           "smoke", "--method", "ce", "--set", "student.train.epochs=40"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    ckpt = smoke_root / ".quest" / "checkpoints" / "student-ce.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "no epoch finished in time"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("quest: interrupted")
    assert list(smoke_root.rglob("*.tmp")) == []
    assert not (smoke_root / "models" / "students" / "ce.pt").exists()
    import torch

    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 40
    # the rerun picks up from that checkpoint (stop it again once it says so)
    rerun = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert rerun.stderr is not None
    resumed = ""
    for line in rerun.stderr:
        if "resuming after epoch" in line:
            resumed = line
            break
    rerun.send_signal(signal.SIGTERM)
    rerun.communicate(timeout=60)
    assert f"resuming after epoch {done}" in resumed
