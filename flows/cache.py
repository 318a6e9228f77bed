"""Content-based cache keys for the Prefect tasks: input file hashes, config sections, code version.

A stage's key is the SHA-256 of four things, so that a re-run with nothing changed is a cache hit
whatever flow run, process or machine computes it (Prefect's DEFAULT policy includes the flow
run id, so it never reuses anything across runs):

(a) the content hash of every input file of the stage (the data source archive, the prepared
    data, the teacher model, the feature matrix, the codebook, the students), read when the task
    starts, i.e. after its upstream tasks have written them; the timing fields of metadata JSON
    are left out, so an upstream rerun with identical results does not cascade;
(b) the stage's own config section(s), hashed with ``quest.config.config_hash``; paths to inputs
    (data.location, teacher.checkpoint) are replaced by the hash of what they point at, so
    moving a file does not invalidate anything while editing it does;
(c) a code version: the hash of the quest source files the stage module imports, followed
    transitively with ``ast`` (lazy imports and package ``__init__`` files included, since
    importing a submodule executes them). Editing quest/engine.py thus recomputes teacher,
    students and evaluate but not prepare, features or codebook; editing quest/codebook.py
    recomputes only the codebook (and downstream only if its result changes); the CLI and
    quest/tracking are in no stage's version. quest/__init__.py imports quest.losses, so
    losses.py and fused_quest.py are in every stage's version (conservative, never stale).

A key alone cannot tell whether the files a cached run wrote are still on disk (DVC checkouts,
``rm -rf models``, a run with other params in between): the flow checks that with
``outputs_present`` before a task and ``outputs_match`` after a cache hit, and reruns the task
with ``refresh_cache=True`` when they fail (see flows/pipeline.py).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from quest.config import Config, build_config, config_hash
from quest.levels import level_config, level_names, level_paths
from quest.methods import get as get_method
from quest.paths import Paths
from quest.stages.common import resolve_location

# Bump to invalidate every key at once (e.g. when the task return format changes).
CACHE_SCHEMA = "1"
STAGES = ("prepare", "teacher", "features", "codebook", "student", "evaluate", "report",
          "validate")
_MISSING = "missing"

# (path, size, mtime_ns, inode) -> sha256: the prepared data is an input of five stages and the
# students of evaluate, so memoising on file identity avoids hashing them again in one process
# (DVC's state database does the same).
_digests: dict[tuple[str, int, int, int], str] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of one file's content ('missing' when it does not exist)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return _MISSING
    ident = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _digests.get(ident)
    if digest is None:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        digest = _digests[ident] = h.hexdigest()
    return digest


def tree_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, or of a directory's relative file names and contents."""
    p = Path(path)
    if not p.is_dir():
        return file_digest(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


# Timing fields of the stages' metadata JSON: they differ on every recompute, so an input
# digest that included them would rerun everything downstream of a stage that recomputed
# identical data (DVC, which hashes whole files, does exactly that).
VOLATILE_KEYS = frozenset({"seconds", "images_per_s"})


def input_digest(path: str | os.PathLike[str]) -> str:
    """Digest of a stage input: its content, less the timing fields of a JSON metadata file."""
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return tree_digest(p)
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return file_digest(p)
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _quest_dir() -> Path:
    import quest

    return Path(quest.__file__).resolve().parent


def _module_file(name: str, base: Path) -> Path | None:
    """The source file of quest module `name` (quest.a.b -> quest/a/b.py or quest/a/b/__init__)."""
    parts = name.split(".")[1:]
    stem = base.joinpath(*parts)
    for cand in (stem.with_suffix(".py"), stem / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imported_modules(path: Path) -> set[str]:
    """Names of the quest modules a source file imports anywhere (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "quest")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "quest":
                found.add(node.module)
                # `from quest.models import zoo` imports the submodule quest.models.zoo
                found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


@cache
def code_files(module: str) -> tuple[str, ...]:
    """Relative paths of the quest source files `module` runs when imported, transitively."""
    base = _quest_dir()
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        # importing quest.a.b executes quest/__init__.py and quest/a/__init__.py first
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        src = _module_file(name, base)
        if src is None:
            continue  # an attribute, not a module (`from quest.config import Config`)
        files.add(src)
        todo.extend(_imported_modules(src))
    return tuple(sorted(f.relative_to(base.parent).as_posix() for f in files))


def code_version(stage: str) -> str:
    """Hash of the source of every quest file the stage's module imports (its code version)."""
    base = _quest_dir().parent
    h = hashlib.sha256()
    # the report stage lives in the outer package quest.report, not in quest.stages, and the
    # validation suites in quest.validation (the runner imports the suite builders)
    outer = {"report": "quest.report", "validate": "quest.validation.runner"}
    for rel in code_files(outer.get(stage, f"quest.stages.{stage}")):
        h.update(f"{rel}\0{file_digest(base / rel)}\n".encode())
    return h.hexdigest()


def _pick(section: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(section, k) for k in keys}


def _location_digest(location: str | None, paths: Paths) -> str:
    """The content hash of what a params path points at; a URL or missing path stays itself."""
    resolved = resolve_location(location, paths.root)
    if resolved and "://" not in resolved and Path(resolved).exists():
        return tree_digest(resolved)
    return str(resolved)


def stage_config(
    stage: str, cfg: Config, paths: Paths, method: str | None = None
) -> dict[str, str]:
    """The config sections a stage reads, each reduced to a config_hash."""
    d = cfg.data
    augment = _pick(d, ("padding", "flip", "loader"))
    if d.padding_mode != "constant":  # added later: the default keeps older cache keys
        augment["padding_mode"] = d.padding_mode
    if stage == "prepare":
        # like dvc.yaml, leave out data.download (it only allows fetching)
        keys = ("source", "image_size", "channels", "on_corrupt", "mean", "std", "subset")
        return {"data": config_hash(_pick(d, keys)),
                "data.location": _location_digest(d.location, paths)}
    if stage == "teacher":
        t = cfg.teacher
        out = {"teacher": config_hash({"arch": t.arch, "train": t.train}),
               "augment": config_hash(augment)}
        out["teacher.checkpoint"] = (_location_digest(t.checkpoint, paths) if t.checkpoint
                                     else "train")
        return out
    if stage == "features":
        # like dvc.yaml, leave out features.batch_size (eval-mode throughput only)
        f = cfg.features
        keys = ("layer", "max_vectors", "dtype", "seed", "pool")
        return {"features": config_hash(_pick(f, keys))}
    if stage == "codebook":
        return {"codebook": config_hash(cfg.codebook)}
    if stage == "student":
        s = cfg.student
        if method is None:
            raise ValueError("the student stage needs a method")
        # only what this method reads: editing student.kd does not retrain the ce student, and
        # student.methods is left out so that adding a method does not retrain the others
        spec = get_method(method)
        section: dict[str, Any] = {"method": method, "arch": s.arch, "train": s.train}
        if spec.needs_codebook:
            section["layer"] = s.layer
        for name in spec.settings:  # the typed settings sections the method reads
            section[name] = getattr(s, name)
        return {"student": config_hash(section), "augment": config_hash(augment)}
    if stage == "evaluate":
        return {"student.methods": config_hash({"methods": cfg.student.methods})}
    if stage == "report":
        # the gallery ranks positions by p_T, which uses the QuEST temperature
        return {"report": config_hash(cfg.report),
                "temperature": config_hash({"t": cfg.student.quest.temperature})}
    if stage == "validate":
        # `method` is the suite name; the same settings as its dvc.yaml validate-* stage
        extra: dict[str, Any] = {
            "data": {"channels": d.channels, "image_size": d.image_size},
            "features": {"max_vectors": cfg.features.max_vectors},
            "codebook": _pick(cfg.codebook, ("seed", "max_points_per_centroid")),
            "predictions": {"methods": cfg.student.methods},
        }[str(method)]
        return {"validation": config_hash(getattr(cfg.validation, str(method))),
                "reads": config_hash(extra)}
    raise ValueError(f"unknown stage {stage!r}")


def stage_inputs(stage: str, cfg: Config, paths: Paths, method: str | None = None) -> list[Path]:
    """The files and directories a stage reads (those written by upstream stages)."""
    if stage == "prepare":
        return []  # its input is the data source, hashed with its config above
    if stage == "teacher":
        return [paths.prepared]
    if stage == "features":
        return [paths.prepared, paths.teacher_model]
    if stage == "codebook":
        return [paths.features, paths.features_meta]
    if stage == "student":
        assert method is not None
        files = [paths.prepared]
        spec = get_method(method)
        if spec.needs_teacher:
            files.append(paths.teacher_model)
        if spec.needs_codebook:
            files += [paths.codebook, paths.codebook_meta]
            for name in level_names(cfg):
                lp = level_paths(paths, name)
                files += [lp.codebook, lp.codebook_meta]
        return files
    if stage == "evaluate":
        return [paths.prepared, paths.teacher_model,
                *(paths.student_model(m) for m in cfg.student.methods)]
    if stage == "report":
        return [paths.prepared, paths.teacher_model, paths.codebook, paths.codebook_meta,
                paths.metrics / "evaluation.json", paths.metrics / "codebook.json",
                paths.plots / "codebook_objective.csv", paths.plots / "codebook_usage.csv",
                *(paths.student_metrics(m) for m in cfg.student.methods)]
    if stage == "validate":
        return {
            "data": [paths.prepared],
            "features": [paths.prepared, paths.features, paths.features_meta],
            "codebook": [paths.features, paths.codebook],
            "predictions": [paths.prepared, *(paths.student_model(m)
                                              for m in cfg.student.methods)],
        }[str(method)]
    raise ValueError(f"unknown stage {stage!r}")


# Stages that run once per QuEST level; for them `method` names the level (None: the first).
LEVEL_STAGES = ("features", "codebook")


def for_level(stage: str, cfg: Config, paths: Paths, method: str | None) -> tuple[Config, Paths]:
    """The config and paths a level stage runs with (unchanged for other stages)."""
    if stage not in LEVEL_STAGES or not method:
        return cfg, paths
    return level_config(cfg, method), level_paths(paths, method)


def stage_outputs(stage: str, paths: Paths, method: str | None = None) -> list[Path]:
    """The files and directories a stage writes (what DVC versions, plus metrics and plots)."""
    if stage in LEVEL_STAGES and method:
        paths = level_paths(paths, method)
    if stage == "prepare":
        return [paths.prepared]
    if stage == "teacher":
        return [paths.teacher_model, paths.metrics / "teacher.json"]
    if stage == "features":
        return [paths.features, paths.features_meta]
    if stage == "codebook":
        return [paths.codebook, paths.codebook_meta, paths.codebook_metrics,
                paths.codebook_plot("objective"), paths.codebook_plot("usage")]
    if stage == "student":
        assert method is not None
        return [paths.student_model(method), paths.student_metrics(method),
                paths.student_curve(method)]
    if stage == "evaluate":
        return [paths.metrics / "evaluation.json", paths.metrics / "per_class.json"]
    if stage == "report":
        # file by file: reports/validation/ belongs to the validate tasks
        return [paths.reports / "report.html", paths.reports / "report.md",
                paths.reports / "figures"]
    if stage == "validate":
        from quest.validation import report_files

        return list(report_files(paths, str(method)).values())
    raise ValueError(f"unknown stage {stage!r}")


def output_digests(stage: str, paths: Paths, method: str | None = None) -> dict[str, str]:
    """Content hash of each output, keyed by its path relative to the root (returned by tasks)."""
    return {p.relative_to(paths.root).as_posix(): tree_digest(p)
            for p in stage_outputs(stage, paths, method)}


def outputs_present(stage: str, paths: Paths, method: str | None = None) -> bool:
    """Whether every output of the stage exists (a directory output must hold files)."""
    for p in stage_outputs(stage, paths, method):
        if p.is_dir():
            if not any(x.is_file() for x in p.rglob("*")):
                return False
        elif not p.is_file():
            return False
    return True


def outputs_match(result: Any, paths: Paths) -> bool:
    """Whether the files on disk are the ones a (cached) task result says it wrote."""
    recorded = result.get("outputs") if isinstance(result, dict) else None
    if not recorded:
        return False
    return all(tree_digest(paths.root / rel) == digest for rel, digest in recorded.items())


def stage_key(stage: str, root: str | os.PathLike[str], config: dict[str, Any],
              method: str | None = None) -> str:
    """The cache key of one stage run: inputs' content, its config sections and its code."""
    cfg, paths = for_level(stage, build_config(config), Paths(Path(root).resolve()), method)
    parts = {
        "schema": CACHE_SCHEMA,
        "stage": stage,
        "method": method,
        "config": stage_config(stage, cfg, paths, method),
        "inputs": {p.relative_to(paths.root).as_posix(): input_digest(p)
                   for p in stage_inputs(stage, cfg, paths, method)},
        "code": code_version(stage),
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return f"quest-{stage}{'-' + method if method else ''}-{hashlib.sha256(blob).hexdigest()}"


def cache_key_fn(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` for a stage task taking (root, config[, method or level])."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        return stage_key(stage, parameters["root"], parameters["config"],
                         parameters.get("method") or parameters.get("level"))

    key.__name__ = f"{stage}_cache_key"
    return key
