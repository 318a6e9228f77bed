"""No function of quest/ or flows/ runs over 60 lines: a longer one holds several steps that
read better as named functions. AST only: nothing is imported, so this takes milliseconds."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60

# Functions allowed over the limit, each with why. Only a function in a file whose content is
# part of the code fingerprint that run records carry (FINGERPRINT_PARTS in
# quest/apps/provenance.py) may wait here, until its code changes anyway; none does today.
ALLOWED: set[str] = set()


def long_functions(files: list[Path], root: Path) -> dict[str, int]:
    """'path:Class.function' -> its length in lines (decorators excluded), for every function
    or method, nested ones included, longer than MAX_LINES."""
    out = {}
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        todo: list[tuple[ast.AST, str]] = [(tree, "")]
        while todo:
            node, prefix = todo.pop()
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1  # type: ignore[operator]
                        if lines > MAX_LINES:
                            out[f"{path.relative_to(root).as_posix()}:{name}"] = lines
                    name += "."
                todo.append((child, name))
    return out


def test_no_function_is_over_60_lines() -> None:
    files = sorted([*(REPO / "quest").rglob("*.py"), *(REPO / "flows").rglob("*.py")])
    found = long_functions(files, REPO)
    new = {k: v for k, v in found.items() if k not in ALLOWED}
    assert new == {}, "split these functions (at most 60 lines each): " + ", ".join(
        f"{k} ({v} lines)" for k, v in sorted(new.items()))
    assert set(found) == ALLOWED, ("no longer over the limit, drop from ALLOWED: "
                                   f"{sorted(ALLOWED - set(found))}")


def test_the_length_scan_names_methods_and_nested_functions(tmp_path: Path) -> None:
    body = "".join(f"        x{i} = {i}\n" for i in range(60))
    (tmp_path / "m.py").write_text("class A:\n    def f(self):\n" + body +
                                   "\n\ndef g():\n    def h():\n" + body + "    return h\n"
                                   "\n\ndef short():\n    return 1\n")
    assert long_functions([tmp_path / "m.py"], tmp_path) == {"m.py:A.f": 61, "m.py:g": 63,
                                                             "m.py:g.h": 61}
