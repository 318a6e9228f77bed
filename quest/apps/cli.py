"""The `quest` command line: one table of subcommands (`COMMANDS`: name -> help, options,
handler), the pipeline's stages first."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quest.infra.errors import QuestError, one_line


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--preset", default=os.environ.get("QUEST_PRESET"),
                   help="named preset: the params file's presets:, the project's presets/*.yaml, "
                        "else an official one packaged with quest (env QUEST_PRESET)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set student.train.epochs=5 (repeatable)")
    p.add_argument("--root", default=".", help="project root holding data/, models/, metrics/")


def _add_tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI, e.g. a team server http://host:5000 (default: env "
                        "MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db)")


def _method_names() -> tuple[str, ...]:
    """The registered methods (built-ins, then installed plug-ins), for help texts."""
    from quest.core.methods import names

    return names()


def _methods_epilog() -> str:
    """One line per registered method: its description and the settings sections it reads."""
    from quest.core.methods import get

    lines = ["methods:"]
    for name in _method_names():
        spec = get(name)
        reads = ", ".join(f"student.{sec}" for sec in spec.settings)
        lines.append(f"  {name:10s} {spec.description}" + (f" ({reads})" if reads else ""))
    return "\n".join(lines)


def _config_command(p: argparse.ArgumentParser) -> None:
    """A stage command's options: the configuration and the project root."""
    _add_config_args(p)


LEVEL_HELP = ("an extra QuEST level named in student.quest.extra_levels (default: the first "
              "level; its files go under data/levels/NAME and models/levels/NAME)")


def _level_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--level", default="", metavar="NAME", help=LEVEL_HELP)


def _student_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.epilog = _methods_epilog()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--method", action="append", default=None,
                   help="method to train (repeatable; default: every one in student.methods)")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="student seeds (default: 0 1 2); recorded pairs are skipped")
    p.add_argument("--method", action="append", default=None,
                   help="method to sweep (repeatable; default: every one in student.methods)")


def _report_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--compare", metavar="OTHER_ROOT", default=None,
                   help="another finished run's project root: side-by-side table and curves")


def _validate_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--what", required=True, choices=("data", "features", "codebook", "predictions"),
                   help="data (after prepare), features, codebook, or predictions (after evaluate)")


def _run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--no-validate", action="store_true",
                   help="skip the Great Expectations suites between stages (e.g. where "
                        "great-expectations is not installed)")
    p.add_argument("--force", action="store_true",
                   help="rerun every stage, even those whose outputs exist and whose inputs, "
                        "settings and code are unchanged since they ran")


def _config_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    # YAML output is a complete, preset-free params file for DVC; redirect it to a new file: a
    # shell truncates `> params.yaml` before quest reads it
    p.add_argument("--format", choices=("json", "yaml"), default="json",
                   help="output format; yaml is a resolved params file, e.g. "
                        "`quest config --preset tiny --format yaml > tiny.yaml && "
                        "mv tiny.yaml params.yaml`")


def _track_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    _add_tracking_args(p)
    p.add_argument("--experiment", default="quest", help="MLflow experiment name (default: quest)")
    p.add_argument("--no-register", action="store_true",
                   help="log runs, metrics and artifacts only; do not register models")


def _promote_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    _add_tracking_args(p)
    p.add_argument("--min-top1", type=float, default=None,
                   help="minimum validation top-1 (0..1) a candidate must reach "
                        "(default: promotion.min_top1 in params.yaml)")
    p.add_argument("--model-name", default=None,
                   help="registered model (default: promotion.model_name, quest-student)")
    p.add_argument("--version", type=int, default=None,
                   help="candidate version (default: the one with the 'challenger' alias)")


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", default=None,
                   help="study file, e.g. studies/strength.yaml (not with --rerun-record)")
    p.add_argument("--root", default=".", help="project root (default: .)")
    p.add_argument("--rerun-record", metavar="FILE", default=None,
                   help="retrain the run a record (results/<study>/*.json) describes, from the "
                        "record alone (same settings hash), into results/runs/rerun/, and "
                        "compare it with the record")
    p.add_argument("--dry-run", action="store_true", help="list the runs still to train")
    p.add_argument("--setting", action="append", default=None,
                   help="run only this setting (repeatable)")
    p.add_argument("--seed", type=int, action="append", default=None,
                   help="run only this seed (repeatable), e.g. seed 0 of every setting first")
    p.add_argument("--method", action="append", default=None,
                   help="run only this method (repeatable), e.g. the methods a goal compares")
    p.add_argument("--reproduce", nargs="?", const="", default=None, metavar="DIR",
                   help="train the selected runs again whatever results/ holds, record them in "
                        "DIR (default results/runs/reproduce-<study>, git-ignored) and compare "
                        "them with the committed records (REPRODUCE.md there)")
    p.add_argument("--missing-val", action="store_true",
                   help="train again the selected runs whose record has no validation accuracy "
                        "(recorded before the validation split); the new record replaces the "
                        "old one in the tables, the old file stays")
    _study_run_args(p)


def _study_run_args(p: argparse.ArgumentParser) -> None:
    """`quest study`'s options of where runs train and what it writes."""
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="train N runs at once on a local Dask cluster of N single-threaded "
                        "worker processes, through Prefect (default: one run at a time here)")
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:8786",
                   help="train the runs on an existing Dask scheduler's workers instead; they "
                        "must see the project root at the same path (docs/studies.md)")
    p.add_argument("--table-only", action="store_true",
                   help="train nothing; regenerate the table from the records")
    p.add_argument("--check", action="store_true",
                   help="train nothing; exit 1 when the study's table in docs/evidence.md is stale")


def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="the new project's folder (created; must be empty)")
    p.add_argument("--preset", default=None,
                   help="start from this preset (the official ones are packaged with quest)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR, overwriting quest's files there")


def _torchrun_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help="torchrun's options, --, the stage")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", metavar="ARCH", help="list the layers of ARCH with output shapes")
    p.add_argument("--input-size", type=int, default=32, help="image side for --layers")
    p.add_argument("--num-classes", type=int, default=100, help="classes for --layers")


def _bench_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--quick", action="store_true", help="small sizes (about a minute on 2 cores)")
    p.add_argument("--images", type=int, default=None, help="images (default 2560; quick 1024)")
    p.add_argument("--batch", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per method (3; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per round (3; quick 2)")
    p.add_argument("--kmeans-k", default=None,
                   help="comma-separated K values (default: 256,codebook.k,4096; quick: 256)")
    p.add_argument("--kmeans-iterations", type=int, default=20, help="k-means iterations")
    p.add_argument("--synthetic", action="store_true", help="random CIFAR-shaped images")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON goes")


def _shards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="image folder with train/ and test/")
    p.add_argument("out", help="empty folder for the shards")
    p.add_argument("--size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")


def _cmd_bench(args: argparse.Namespace) -> None:
    from quest.apps.bench import parse_k_list, run_bench, summary

    cfg = _load_cfg(args)
    q = args.quick
    k_text = args.kmeans_k or ("256" if q else f"256,{cfg.codebook.k},4096")
    ks = list(dict.fromkeys(parse_k_list(k_text)))
    path = run_bench(
        cfg, Path(args.root).resolve(), images=args.images or (1024 if q else 2560),
        batch=args.batch, rounds=args.rounds or (2 if q else 3),
        steps=args.steps or (2 if q else 3),
        kmeans_k=ks, kmeans_iterations=args.kmeans_iterations, synthetic=args.synthetic,
        out_dir=Path(args.out_dir), command="quest " + " ".join(sys.argv[1:]))
    print(summary(path))


def _cmd_models(args: argparse.Namespace) -> None:
    from quest.core.models.taps import list_layers
    from quest.core.models.zoo import build_model, default_feature_layer, model_summary

    if args.layers:
        model = build_model(args.layers, args.num_classes)
        default = default_feature_layer(args.layers)
        print(f"{args.layers}: layers at input 3x{args.input_size}x{args.input_size} "
              f"(* = default QuEST layer)")
        for name, kind, shape in list_layers(model, (3, args.input_size, args.input_size)):
            mark = "*" if name == default else " "
            print(f"{mark} {name:<28} {kind:<18} {'x'.join(map(str, shape))}")
        return
    rows = model_summary()
    print(f"{'model':<14} {'family':<14} {'params (10 cls)':>16} {'params (100 cls)':>17}")
    for r in rows:
        print(f"{r['name']!s:<14} {r['family']!s:<14} {r['params_10']:>16,} {r['params_100']:>17,}")


def _load_cfg(args: argparse.Namespace) -> Any:
    """The validated Config named by --params (relative to --root), --preset and --set."""
    from quest.infra.config import load_config

    # Path joining keeps an absolute --params as it is
    return load_config(Path(args.root) / args.params, args.preset, args.overrides)


def _cmd_config(args: argparse.Namespace) -> None:
    """`quest config`: the resolved configuration, checked as a stage's start would."""
    from quest.core.checks import check_runnable
    from quest.core.methods import config_dict

    cfg = _load_cfg(args)
    check_runnable(cfg)  # `quest config` checks everything a stage's start would
    # every registered method's section (plug-ins included), its defaults filled in
    resolved = config_dict(cfg)
    if args.format == "yaml":
        import yaml

        # block style, keys in definition order: readable and diff-friendly for DVC params
        print(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False), end="")
    else:
        print(json.dumps(resolved, indent=2))


TORCHRUN_STAGES = ("prepare", "teacher", "features", "codebook", "student", "evaluate",
                   "validate")

ProjectHandler = Callable[[argparse.Namespace, Any, Any], None]


def _in_project(handler: ProjectHandler) -> Callable[[argparse.Namespace], None]:
    """A command that works on a project: `handler(args, cfg, paths)` runs with the config
    loaded, a log file under logs/ and the project's run lock held (see `_run_in_project`)."""
    return functools.partial(_run_in_project, handler)


def _run_in_project(handler: ProjectHandler, args: argparse.Namespace) -> None:
    from quest.infra.paths import Paths
    from quest.infra.progress import setup_logging

    cfg = _load_cfg(args)
    paths = Paths(Path(args.root).resolve())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # a torchrun job: students train on every rank, the other stages run on rank 0 alone (see
    # Stage.start); rank 0 holds the lock. Only a job imports torch here (WORLD_SIZE > 1, as
    # env_info reads it): a validation or report process never needs it
    dist_info = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from quest.core.distributed import env_info

        dist_info = env_info()
    if dist_info is not None and args.command not in TORCHRUN_STAGES:
        raise QuestError(f"torchrun runs the stage commands ({', '.join(TORCHRUN_STAGES)}), "
                         f"not `quest {args.command}`: run it in one process")
    rank = f"-rank{dist_info.rank}" if dist_info is not None else ""
    setup_logging(str(paths.logs / f"{args.command}-{stamp}{rank}.log"), args.debug)
    if dist_info is not None and args.command != "student" and not dist_info.is_main:
        # only the students train data-parallel; every other stage runs once, on rank 0, so
        # that no two processes write the same outputs
        from quest.infra.progress import log

        log.info("%s runs on rank 0 only (this is rank %d)", args.command, dist_info.rank)
        return
    from quest.infra.runlock import run_lock

    lock = (run_lock(paths.root, f"quest {args.command}")
            if dist_info is None or dist_info.is_main else contextlib.nullcontext())
    with lock:
        handler(args, cfg, paths)


def _run_table_stage(args: argparse.Namespace, cfg: Any, paths: Any) -> None:
    """A single stage of the stage table (quest/apps/stage_table.py), as `quest run` runs it."""
    from quest.apps.stage_table import BY_NAME

    if args.command == "student":
        from quest.core.methods import get

        methods = args.method or cfg.student.methods
        for method in methods:
            get(method)  # an unknown name fails before anything trains
        for method in methods:
            BY_NAME["student"].start(cfg, paths, method)
    elif getattr(args, "level", ""):
        BY_NAME[f"{args.command}-level"].start(cfg, paths, args.level)
    else:
        BY_NAME[args.command].start(cfg, paths, None)


def _cmd_run(args: argparse.Namespace, cfg: Any, paths: Any) -> None:
    """`quest run`: every stage in order, the suites between them, then the accuracy table."""
    from quest.apps.pipeline import run_pipeline
    from quest.apps.stages.evaluate import format_table
    from quest.apps.stages.resume import StageRecords

    checks = None
    if not args.no_validate:
        # the outer validation layer fills the core pipeline's hook (GX loads only here)
        from quest.apps.validation import pipeline_checks

        checks = pipeline_checks(cfg, paths)
    t0 = time.perf_counter()
    out = run_pipeline(cfg, paths, checks, StageRecords(cfg, paths, force=args.force))
    print(format_table(out["evaluation"]))
    if out["skipped"]:
        print("skipped (finished, inputs unchanged; --force reruns): " + ", ".join(out["skipped"]))
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in out["seconds"].items()))
    print(f"total wall time: {time.perf_counter() - t0:.1f}s")


def _cmd_sweep(args: argparse.Namespace, cfg: Any, paths: Any) -> None:
    """`quest sweep`: the study runner over the project's own outputs (quest/apps/study/sweep.py),
    then the table of the project's run records."""
    from quest.apps.results import load_records, results_table
    from quest.apps.study.sweep import run_sweep

    run_sweep(cfg, paths, args.seeds, args.method or list(cfg.student.methods))
    print(results_table(load_records(paths.results)))


def _cmd_report(args: argparse.Namespace, cfg: Any, paths: Any) -> None:
    from quest.apps.report import run_report

    out = run_report(cfg, paths, Path(args.compare) if args.compare else None)
    print(f"report: {out['html']} and {out['markdown']} "
          f"({len(out['figures'])} figures, {out['gallery_words']} gallery words)")


def _cmd_evaluate(args: argparse.Namespace, cfg: Any, paths: Any) -> None:
    from quest.apps.stages.evaluate import format_table, run_evaluate

    print(format_table(run_evaluate(cfg, paths)))


def _cmd_validate(args: argparse.Namespace, cfg: Any, paths: Any) -> None:
    from quest.apps.validation import run_validation

    rep = run_validation(args.what, cfg, paths)
    print(f"{args.what} validation passed: {rep['passed']} of {rep['evaluated']} "
          f"expectations (reports/validation/{args.what}.json, {rep['data_docs']})")


def _cmd_track(args: argparse.Namespace, cfg: Any, paths: Any) -> None:
    from quest.apps.tracking import track_pipeline

    out = track_pipeline(cfg, paths, args.tracking_uri, args.experiment,
                         register=not args.no_register)
    print(f"MLflow run {out['parent_run_id']} ({len(out['child_run_ids'])} stage runs) "
          f"in experiment '{out['experiment']}' at {out['tracking_uri']}")
    if "challenger" in out:
        versions = ", ".join(f"{m} v{v}" for m, v in out["student_versions"].items())
        ch = out["challenger"]
        pick = (f"challenger (best val top-1 {ch['val_top1']:.4f}): {ch['method']} "
                f"v{ch['version']}" if ch else out["challenger_note"])
        print(f"registered quest-teacher v{out['teacher_version']}; quest-student {versions}; "
              f"{pick}")


def _cmd_promote(args: argparse.Namespace) -> None:
    from quest.apps.tracking import promote, resolve_tracking_uri

    cfg = _load_cfg(args)
    uri = resolve_tracking_uri(Path(args.root).resolve(), args.tracking_uri)
    min_top1 = cfg.promotion.min_top1 if args.min_top1 is None else args.min_top1
    from quest.infra.progress import log, setup_logging

    logs = Path(args.root).resolve() / "logs"
    setup_logging(str(logs / f"promote-{time.strftime('%Y%m%d-%H%M%S')}.log"), args.debug)
    out = promote(uri, min_top1, args.model_name or cfg.promotion.model_name, args.version)
    line = ("promoted: " if out["promoted"] else "not promoted: ") + out["reason"]
    log.info("promote %s: %s", uri, line)
    print(line)


def _cmd_study(args: argparse.Namespace) -> int:
    from quest.apps.study.runner import write_aliases
    from quest.apps.study.spec import load_study, planned_runs
    from quest.apps.study.table import update_tables

    root = Path(args.root).resolve()
    if args.rerun_record:
        return _cmd_rerun(args, root)
    if args.study is None:
        raise QuestError("quest study needs a study file (e.g. studies/main-job.yaml) or "
                         "--rerun-record FILE")
    if args.workers is not None and args.workers < 1:
        raise QuestError(f"--workers must be 1 or more, not {args.workers}")
    study = load_study(args.study, root)
    if args.check:
        stale = update_tables(study, root, check=True)
        for path in stale:
            print(f"{path}: table of study {study.name} is stale: run `quest study "
                  f"{args.study} --table-only`", file=sys.stderr)
        return 1 if stale else 0
    if not args.table_only:
        trained = _study_train(args, study, root)
        if trained is not None:
            return trained
    else:
        write_aliases(study, root, planned_runs(study, root))
    for path in update_tables(study, root):
        print(f"wrote {path}")
    return 0


def _study_train(args: argparse.Namespace, study: Any, root: Path) -> int | None:
    """Train a study's runs; the exit code when the command ends here (a dry run, a
    reproduction), else None: the tables are regenerated next."""
    from quest.apps.study.runner import reproduction_table, run_study
    from quest.infra.progress import setup_logging

    stamp = time.strftime("%Y%m%d-%H%M%S")
    setup_logging(str(root / "logs" / f"study-{study.name}-{stamp}.log"), args.debug)
    # no project lock: a study may run beside everyday commands on the project, and
    # beside other runners of studies; each run and each shared stage has its own lock
    again = None
    if args.reproduce is not None:
        again = (Path(args.reproduce).resolve() if args.reproduce
                 else root / "results" / "runs" / f"reproduce-{study.name}")
    stale = None
    if again is not None:  # which committed records today's code would not reproduce
        from quest.apps.study.table import staleness

        stale = staleness(study, root, args.setting, args.seed, args.method)
        print(stale)
    run_study(study, root, dry_run=args.dry_run, only=args.setting, seeds=args.seed,
              reproduce=again, methods=args.method, missing_val=args.missing_val,
              workers=args.workers, dask_address=args.dask_address)
    if args.dry_run:
        return 0
    if again is None:
        return None
    from quest.infra.io_utils import write_text_atomic

    table = reproduction_table(study, root, again, args.setting, args.seed)
    write_text_atomic(again / "REPRODUCE.md", f"# Reproduction of study {study.name}\n\n"
                      f"{table}\n\n{stale}\n")
    print(table)
    print(f"wrote {again / 'REPRODUCE.md'}")
    return 0


def _cmd_rerun(args: argparse.Namespace, root: Path) -> int:
    """`quest study --rerun-record FILE`: retrain one recorded run and compare."""
    from quest.apps.rerun import comparison, rerun_record
    from quest.infra.progress import setup_logging
    from quest.infra.runlock import run_lock

    if args.study is not None:
        raise QuestError("--rerun-record takes the record alone: drop the study file")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    setup_logging(str(root / "logs" / f"rerun-{stamp}.log"), args.debug)
    with run_lock(root / ".quest" / "studies" / "rerun", "quest study --rerun-record"):
        record, again = rerun_record(args.rerun_record, root)
    print(f"rerun of {args.rerun_record}:")
    for line in comparison(record, again):
        print(f"  {line}")
    return 0


def _cmd_init(args: argparse.Namespace) -> None:
    from quest.apps.project import init_project

    files = init_project(args.dir, args.preset, args.force)
    print(f"wrote {len(files)} files into {args.dir}: fill in params.yaml's FILL IN "
          "lines, then `quest run` (or `git init && dvc init && dvc repro`) there")


def _cmd_torchrun(args: argparse.Namespace) -> int:
    # `main` hands `quest torchrun ...` to the launcher before parsing; this is the path of
    # options before it (e.g. `quest --debug torchrun ...`)
    from quest.apps.launch import run_torchrun

    return run_torchrun(args.rest)


def _cmd_shards(args: argparse.Namespace) -> None:
    from quest.apps.shards import write_shards

    write_shards(Path(args.src), Path(args.out), args.size, args.seed)


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help (a function where it lists the registered methods),
    what adds its options, what runs it (returning an exit code, or None for 0) and its
    longer description (default: the help)."""

    help: str | Callable[[], str]
    args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str = ""


# every subcommand, in the order `quest --help` lists them
COMMANDS: dict[str, Command] = {
    "prepare": Command("read the configured data source into data/prepared/",
                       _config_command, _in_project(_run_table_stage)),
    "teacher": Command("import or train the teacher; evaluate it; write models/teacher/",
                       _config_command, _in_project(_run_table_stage)),
    "features": Command("extract the teacher's spatial feature vectors into data/features/",
                        _level_args, _in_project(_run_table_stage)),
    "codebook": Command("fit the k-means visual-word vocabulary into models/codebook/",
                        _level_args, _in_project(_run_table_stage)),
    "student": Command(lambda: f"train a student with one method ({', '.join(_method_names())})",
                       _student_args, _in_project(_run_table_stage)),
    "sweep": Command("retrain students with several seeds; record each run in results/",
                     _sweep_args, _in_project(_cmd_sweep)),
    "evaluate": Command("evaluate teacher and students into metrics/evaluation.json",
                        _config_command, _in_project(_cmd_evaluate)),
    "report": Command("write reports/report.html (self-contained) and reports/report.md: "
                      "accuracy, curves, codebook, visual-word gallery",
                      _report_args, _in_project(_cmd_report)),
    "validate": Command("run a Great Expectations suite over a stage's output; writes "
                        "reports/validation/ and fails (exit 2) listing failed expectations",
                        _validate_args, _in_project(_cmd_validate)),
    "run": Command("run the whole pipeline and print the accuracy table",
                   _run_args, _in_project(_cmd_run)),
    "config": Command("print the resolved, validated configuration (JSON or YAML)",
                      _config_args, _cmd_config),
    "track": Command("log the finished pipeline to MLflow (parent run + a child run per stage) "
                     "and register the teacher and students",
                     _track_args, _in_project(_cmd_track)),
    "promote": Command(
        "move the 'champion' alias to a candidate student if it is better", _promote_args,
        _cmd_promote,
        "Gated promotion: point quest-student@champion at the candidate (default: the "
        "@challenger set by `quest track`) only if its val_top1 tag beats the current "
        "champion's and clears --min-top1; otherwise change nothing and say why."),
    "study": Command(
        "run a study (settings x methods x seeds) resumably; write its table", _study_args,
        _cmd_study,
        "Train every run of a study file not yet recorded under results/ (an interrupted study "
        "resumes), then regenerate its table in docs/evidence.md and results/<study>/TABLE.md."),
    "init": Command(
        "write a new project (params.yaml, dvc.yaml, prefect.yaml, ...) into DIR", _init_args,
        _cmd_init,
        "Write a working project into DIR: params.yaml (the active configuration, the data and "
        "teacher keys to fill in commented), dvc.yaml, prefect.yaml, .gitignore, .dvcignore "
        "and a README. Then edit params.yaml and run `quest run` or `dvc repro` there."),
    "torchrun": Command(
        "torchrun around a stage command; a rank's error stays one line", _torchrun_args,
        _cmd_torchrun,
        "quest torchrun [TORCHRUN OPTIONS] -- STAGE [ARGS]: runs `torchrun OPTIONS -m quest "
        "STAGE ARGS`, passes the ranks' output through, and ends a user's error in any rank "
        "with one line (no launcher traceback) and exit code 2"),
    "models": Command("list the model zoo, or a model's tappable layers", _models_args,
                      _cmd_models),
    "bench": Command(
        "measure loader, training steps, features and k-means; write JSON", _bench_args,
        _cmd_bench,
        "Benchmark in one process: in-memory loader vs DataLoader, ce/kd/quest training "
        "steps, teacher feature extraction, FAISS vs torch k-means, peak memory; writes "
        "benchmarks/results/bench-<device>.json. Uses data/prepared or the configured "
        "archive, else random images."),
    "shards": Command(
        "write WebDataset tar shards from an image folder", _shards_args, _cmd_shards,
        "Write SRC's train/<class>/<image> and test/<class>/<image> as WebDataset shards "
        "OUT/train-000000.tar, ... (KEY.jpg + KEY.cls) and OUT/classes.txt, for data.format: "
        "stream with data.location: OUT."),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand of `COMMANDS`; with `only`, the other
    subcommands are names alone (their arguments and registry-built help texts are skipped:
    listing the methods imports the core, torch included, ~2 CPU-s a process)."""
    parser = argparse.ArgumentParser(
        prog="quest",
        description="QuEST knowledge distillation: quantized teacher features as student targets.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        help_text = command.help() if callable(command.help) else command.help
        p = sub.add_parser(name, help=help_text, description=command.description or help_text)
        command.args(p)
    return parser


def _named_command(argv: list[str]) -> str | None:
    """The subcommand `argv` runs, when it names one before any option but --debug (else None:
    the full parser answers, --help and mistakes included)."""
    for arg in argv:
        if arg == "--debug":
            continue
        return arg if arg in COMMANDS else None
    return None


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; QuestErrors become one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["torchrun"]:  # its arguments are torchrun's and the stage's, not ours
        from quest.apps.launch import run_torchrun

        try:
            return run_torchrun(argv[1:])
        except QuestError as exc:
            print(f"quest: error: {exc}", file=sys.stderr)
            return 2
    try:
        # the named command's help lists the registered methods: plug-ins load there
        parser = build_parser(_named_command(argv))
    except QuestError as exc:
        print(f"quest: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    # a scheduler's SIGTERM ends the run like Ctrl-C: temporary files are removed and training
    # checkpoints the step it reached (Trainer defers the signal to the end of the step)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command].run(args) or 0
    except QuestError as exc:
        if args.debug:
            raise
        print(f"quest: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quest: interrupted; training progress is checkpointed, rerun the same command "
              "to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
