"""The layers of quest/ as folders, and their order: infra < core < apps.

- `quest.infra` (errors, settings, paths, files, progress, locks) imports nothing else of quest;
- `quest.core` (models, data, losses, methods, codebook, engine, checkpoints) imports infra;
- `quest.apps` (stages, CLI, studies, bench, results, report, tracking, validation) imports both.

Third-party imports of infra and core: torch, torchvision and numpy, plus Pillow and PyYAML
(images, YAML) and pydantic, which the typed settings (quest/infra/config.py) need and which is
therefore a core dependency in pyproject.toml; faiss is the codebook's optional k-means backend,
imported only inside the function that uses it, and tqdm draws progress bars when installed.
MLflow, Prefect, DVC, Great Expectations, pandas and matplotlib load only in apps and flows/,
and only when their feature runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

QUEST = Path(__file__).resolve().parents[1] / "quest"
RANK = {"infra": 0, "core": 1, "apps": 2}
# webdataset: the tar-shard reader of the streaming path, imported only when shards are read
CORE_THIRD_PARTY = {"torch", "torchvision", "numpy", "PIL", "yaml", "pydantic", "faiss", "tqdm",
                    "webdataset"}
OUTER = ("mlflow", "prefect", "dvc", "great_expectations", "pandas", "faiss", "matplotlib")


def _modules() -> list[Path]:
    return sorted(p for p in QUEST.rglob("*.py") if p.parent != QUEST)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "quest":  # `from quest import x`: x is the module
                out += [(node.lineno, f"quest.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def test_every_module_sits_in_a_layer_folder() -> None:
    top = sorted(p.name for p in QUEST.iterdir() if p.suffix == ".py" or
                 (p.is_dir() and p.name != "__pycache__"))
    assert top == ["__init__.py", "__main__.py", "apps", "core", "infra"]


def test_layers_import_only_downwards() -> None:
    wrong = []
    for path in _modules():
        layer = path.relative_to(QUEST).parts[0]
        for line, mod in _imports(path):
            parts = mod.split(".")
            if parts[0] != "quest":
                continue
            if len(parts) == 1:
                continue  # the root package: only its __version__ and __file__
            target = parts[1]
            if target not in RANK or RANK[target] > RANK[layer]:
                wrong.append(f"{path.relative_to(QUEST.parent)}:{line} imports {mod}")
    assert wrong == [], "\n".join(wrong)


def test_infra_and_core_import_only_the_core_third_party_set() -> None:
    wrong = []
    for path in _modules():
        if path.relative_to(QUEST).parts[0] == "apps":
            continue
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top == "quest" or top in sys.stdlib_module_names or top in CORE_THIRD_PARTY:
                continue
            wrong.append(f"{path.relative_to(QUEST.parent)}:{line} imports {mod}")
    assert wrong == [], "\n".join(wrong)


def test_the_layering_check_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from quest.apps.stages import common\n")
    assert (3, "quest.apps.stages") not in _imports(bad)
    assert _imports(bad) == [(2, "quest.apps.stages")]


def test_core_and_stages_import_without_outer_layers() -> None:
    code = (
        "import sys\n"
        "import quest, quest.apps.cli, quest.core.engine, quest.core.distill\n"
        "import quest.core.losses, quest.core.codebook, quest.core.models, quest.core.data\n"
        "import quest.apps.pipeline\n"
        f"bad = [m for m in {OUTER!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


REPO = QUEST.parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(files: list[Path], root: Path = REPO) -> dict[str, set[str]]:
    """module -> the modules of `files` (under `root`) it imports, lazy imports included.
    Importing a module also runs its packages' __init__ files, so they count as imported too,
    except the importer's own packages (already running when it imports)."""
    mods = {_module_name(p, root): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        parts = name.split(".")
        own = {".".join(parts[:i]) for i in range(1, len(parts) + is_pkg)}
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package
                    up = parts[:len(parts) - node.level + is_pkg]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                # `from pkg import name`: the submodule pkg.name when there is one
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                            for a in node.names]
        edges = set()
        for target in targets:
            t = target.split(".")
            edges |= {".".join(t[:i]) for i in range(1, len(t) + 1)} & mods.keys()
        graph[name] = edges - own - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: every strongly connected group of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_apps_and_flows_import_without_cycles() -> None:
    """No module of quest/apps or flows/ imports, at any depth or through a package's
    __init__, a module that imports it back: each piece sits below what uses it."""
    files = sorted([*(QUEST / "apps").rglob("*.py"), *(REPO / "flows").rglob("*.py")])
    graph = import_graph(files)
    assert "quest.apps.study.table" in graph["quest.apps.report.build"]  # lazy imports count
    found = cycles(graph)
    assert found == [], "\n".join(
        " <-> ".join(group) + ": " + "; ".join(f"{m} imports {sorted(graph[m] & set(group))}"
                                               for m in group) for group in found)


def test_the_cycle_check_catches_a_lazy_cycle_through_a_package(tmp_path: Path) -> None:
    pkg = tmp_path / "quest" / "apps" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from quest.apps.pkg.build import x\n")
    (pkg / "build.py").write_text("def x():\n    from quest.apps.other import y\n")
    (tmp_path / "quest" / "apps" / "other.py").write_text("from quest.apps.pkg.figures import z\n")
    (pkg / "figures.py").write_text("z = 1\n")
    found = cycles(import_graph(sorted((tmp_path / "quest").rglob("*.py")), tmp_path))
    assert found == [["quest.apps.other", "quest.apps.pkg", "quest.apps.pkg.build"]]
