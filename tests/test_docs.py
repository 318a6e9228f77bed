"""The documentation site: it builds with `mkdocs build --strict` (broken links and missing
pages fail), and the configuration reference is exactly what the schema and params.yaml give."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from quest.apps.config_doc import DOC_PATH, configuration_markdown, meaning_of, params_comments
from quest.apps.config_doc import schema_keys as config_keys

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is what `python -m quest.apps.config_doc` writes."""
    params = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert (REPO / DOC_PATH).read_text(encoding="utf-8") == configuration_markdown(params)


def test_every_setting_is_in_the_reference_with_a_meaning() -> None:
    """Every key of the schema has a row, a type, a default and a meaning (a new setting
    without a comment in params.yaml or a description fails here)."""
    params = (REPO / "params.yaml").read_text(encoding="utf-8")
    comments = params_comments(params)
    page = (REPO / DOC_PATH).read_text(encoding="utf-8")
    keys = config_keys()
    assert len(keys) > 90
    for key, _, _ in keys:
        assert f"| `{key}` |" in page, key
        assert meaning_of(key, comments), f"{key} has no meaning: comment it in params.yaml"


def test_params_comments_follow_the_nesting() -> None:
    """A trailing comment wins over the block above it, and nesting is tracked by indent."""
    text = ("# top\na:\n  # above b\n  b: 1\n  c: 2   # on c\n  d:\n    e: 3  # deep\n"
            "f: 4\npresets:\n  x: 1  # not read\n")
    assert params_comments(text) == {"a": "top", "a.b": "above b", "a.c": "on c",
                                     "a.d.e": "deep"}


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    """`mkdocs build --strict` succeeds: every nav page exists, every link resolves, the API
    reference's objects are found."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = Path(sys.executable).parent / "mkdocs"
    out = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "StepContext" in api and "MethodSpec" in api
