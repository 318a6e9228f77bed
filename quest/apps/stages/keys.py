"""Content-based stage keys (Prefect cache keys, `quest run` resume records): inputs, settings, code

A stage's key is the SHA-256 of four things, so that a re-run with nothing changed is a cache hit
whatever flow run, process or machine computes it (Prefect's DEFAULT policy includes the flow
run id, so it never reuses anything across runs):

(a) the content hash of every input file of the stage (the data source archive, the prepared
    data, the teacher model, the feature matrix, the codebook, the students), read when the task
    starts, i.e. after its upstream tasks have written them; the timing fields of metadata JSON
    are left out, so an upstream rerun with identical results does not cascade;
(b) the values of the settings the stage reads, hashed with ``quest.infra.config.config_hash``;
    paths to inputs (data.location, teacher.checkpoint) are replaced by the hash of what they point
    at, so moving a file does not invalidate anything while editing it does;
(c) a code version: the hash of the quest source files the stage module imports, followed
    transitively with ``ast`` (lazy imports and package ``__init__`` files included, since
    importing a submodule executes them). The CLI and quest/tracking are in no stage's
    version; quest/__init__.py imports quest.core.losses, so losses.py and fused_quest.py are in
    every stage's version (conservative, never stale).

The settings, the input files and the module whose closure is the code all come from the stage
table (quest/apps/stage_table.py), which also writes dvc.yaml's params, deps and outs
(flows/dvc_yaml.py): DVC and Prefect rerun a stage for the same changes.

A key alone cannot tell whether the files a cached run wrote are still on disk (DVC checkouts,
``rm -rf models``, a run with other params in between): the flow checks that with
``outputs_present`` before a task and ``outputs_match`` after a cache hit, and reruns the task
with ``refresh_cache=True`` when they fail (see flows/pipeline.py). `quest run` records the same
key beside a finished stage's outputs and skips the stage while both still match
(quest/apps/stages/resume.py).
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

from quest.apps.stage_table import LEVEL_ITEM, LOCATION_PARAMS, get_param, stage_for
from quest.apps.stage_table import STAGES as TABLE
from quest.apps.stages.common import resolve_location
from quest.core.levels import level_names, level_paths
from quest.core.methods import get as get_method
from quest.infra.config import Config, build_config, config_hash
from quest.infra.paths import Paths

# Bump to invalidate every key at once (e.g. when the task return format changes).
CACHE_SCHEMA = "2"
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
    """Digest of a stage input: its content, less the timing fields of JSON metadata files
    (a directory: each file's name and digest, so its metadata's timings are left out too, and
    hidden files are skipped)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        # hidden files are bookkeeping (DVC writes a .gitignore beside the outs it commits)
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
            h.update(f"{f.relative_to(p).as_posix()}\0{input_digest(f)}\n".encode())
        return h.hexdigest()
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
                # `from quest.core.models import zoo` imports the submodule quest.core.models.zoo
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
            continue  # an attribute, not a module (`from quest.infra.config import Config`)
        files.add(src)
        todo.extend(_imported_modules(src))
    return tuple(sorted(f.relative_to(base.parent).as_posix() for f in files))


def code_version(stage: str) -> str:
    """Hash of the source of every quest file the stage's module imports (its code version)."""
    base = _quest_dir().parent
    h = hashlib.sha256()
    for rel in code_files(stage_code(stage)):
        h.update(f"{rel}\0{file_digest(base / rel)}\n".encode())
    return h.hexdigest()


def stage_code(family: str) -> str:
    """The module whose import closure is a stage family's code (from the stage table)."""
    return next(s.code for s in TABLE if s.family == family)


def _location_digest(location: str | None, paths: Paths) -> str:
    """The content hash of what a params path points at; a URL or missing path stays itself."""
    resolved = resolve_location(location, paths.root)
    if resolved and "://" not in resolved and Path(resolved).exists():
        return tree_digest(resolved)
    return str(resolved)


def stage_config(
    stage: str, cfg: Config, paths: Paths, method: str | None = None
) -> dict[str, str]:
    """The settings a stage reads (its params in the stage table), hashed; input paths outside
    the project (data.location, teacher.checkpoint) by the content they point at."""
    spec = stage_for(stage, method)
    if spec.per == "method" and method is None:
        raise ValueError(f"the {stage} stage needs a method")
    values: dict[str, Any] = {}
    out: dict[str, str] = {}
    for dotted in spec.params(method):
        dotted = dotted.replace(LEVEL_ITEM, str(method))
        value = get_param(cfg, dotted)
        if dotted in LOCATION_PARAMS:
            out[dotted] = _location_digest(value, paths) if value else "none"
        else:
            values[dotted] = value
    out["params"] = config_hash(values)
    return out


def stage_inputs(stage: str, cfg: Config, paths: Paths, method: str | None = None) -> list[Path]:
    """The files and directories a stage reads (those written by upstream stages)."""
    spec = stage_for(stage, method)
    deps = spec.deps(cfg, paths, method)
    if spec.family == "student" and method is not None and get_method(method).needs_codebook:
        # the table's models/levels is DVC's ordering; Prefect hashes the levels in use
        deps = [d for d in deps if d != paths.root / "models" / "levels"]
        for name in level_names(cfg):
            deps.append(level_paths(paths, name).codebook.parent)
    return deps


def stage_outputs(stage: str, paths: Paths, method: str | None = None) -> list[Path]:
    """The files and directories a stage writes (what DVC versions, plus metrics and plots)."""
    return stage_for(stage, method).outs(paths, method)


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
    return stage_key_for(stage, build_config(config), Paths(Path(root).resolve()), method)


def stage_key_for(stage: str, cfg: Config, paths: Paths, method: str | None = None) -> str:
    """`stage_key` of a built config and layout (what `quest run` records beside outputs)."""
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
    """A Prefect ``cache_key_fn`` for a stage task taking (root, config[, key]): the key is
    the method, extra level or suite of a keyed task."""

    def key(context: Any, parameters: dict[str, Any]) -> str:
        return stage_key(stage, parameters["root"], parameters["config"], parameters.get("key"))

    key.__name__ = f"{stage}_cache_key"
    return key
