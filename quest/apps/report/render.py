"""Render the report as one self-contained HTML page (base64 PNGs) and as Markdown, from the
Jinja2 templates in templates/ (package data)."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field
from typing import Any

from quest.apps.report.gallery import Gallery


@dataclass
class Table:
    """A table: header cells and rows of already formatted cells (numbers right-aligned)."""

    header: list[str]
    rows: list[list[str]]
    numeric: list[bool]


@dataclass
class Plot:
    """A figure saved as figures/<name>.png and embedded in the HTML."""

    name: str
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Report:
    """Everything the report shows, formatted; rendered to HTML and Markdown alike."""

    title: str
    facts: list[tuple[str, str]]
    accuracy: Table
    comparison: Table | None = None
    curves: list[Plot] = field(default_factory=list)
    codebook: Table | None = None
    codebook_plot: Plot | None = None
    codebook_note: str = ""
    gallery: Gallery | None = None
    gallery_note: str = ""
    gallery_plots: list[Plot] = field(default_factory=list)
    # (study name, description, its generated Markdown tables, its figures: top-1 against
    # images per class and against visual-word accuracy, where the study has them)
    studies: list[tuple[str, str, str, list[Plot]]] = field(default_factory=list)


def cell_class(cell: str, numeric: bool) -> str:
    """A table cell's HTML classes: numbers right-aligned, signed deltas green or red."""
    cls = ["num"] if numeric else []
    if numeric and cell.startswith(("+", "−")) and cell not in ("+0.00", "−0.00"):
        cls.append("pos" if cell.startswith("+") else "neg")
    return " ".join(cls)


def markdown_to_html(text: str) -> str:
    """The Markdown of the study tables (paragraphs, pipe tables, `code`) as HTML; image
    lines are left out (the figures are embedded apart, and a report links no file)."""
    import markdown

    kept = "\n".join(line for line in text.splitlines() if not line.startswith("!["))
    return markdown.markdown(kept, extensions=["tables"], output_format="html")


@functools.cache
def _environment(kind: str) -> Any:
    """The Jinja2 environment of the report's templates (package data: templates/*.j2);
    HTML autoescapes every value, Markdown takes the text as it is."""
    import jinja2
    import markupsafe

    env = jinja2.Environment(loader=jinja2.PackageLoader("quest.apps.report", "templates"),
                             autoescape=kind == "html", trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.globals.update(zip=zip, cell_class=cell_class)
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    env.filters["markdown"] = lambda text: markupsafe.Markup(markdown_to_html(text))
    return env


def render_html(r: Report) -> str:
    """The report as one HTML page with every image inline: it opens offline, alone."""
    return _environment("html").get_template("report.html.j2").render(r=r)


def render_markdown(r: Report, figures_dir: str = "figures") -> str:
    """The report as Markdown; images are links to the PNG files written beside it."""
    text = _environment("md").get_template("report.md.j2").render(r=r, figures_dir=figures_dir)
    return text.rstrip("\n") + "\n"  # every section ends in a blank line; the file in one \n
