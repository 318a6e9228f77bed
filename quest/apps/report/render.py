"""Render the report as one self-contained HTML page (base64 PNGs) and as Markdown."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

from quest.apps.report.gallery import Gallery

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#1a7f37}.neg{color:#c0392b}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.9em;color:#555}.words{display:flex;flex-wrap:wrap;gap:1.2em}
.word{border:1px solid #ddd;padding:.5em}.note{color:#555;font-size:.92em}
"""


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


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in t.header)
    body = []
    for row in t.rows:
        cells = []
        for cell, num in zip(row, t.numeric, strict=True):
            cls = ["num"] if num else []
            if num and cell.startswith(("+", "−")) and cell not in ("+0.00", "−0.00"):
                cls.append("pos" if cell.startswith("+") else "neg")
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{_esc(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<img alt="{_esc(plot.title)}" src="data:image/png;base64,{data}">')


def _html_figure(plot: Plot) -> str:
    cap = f"<figcaption>{_esc(plot.caption or plot.title)}</figcaption>"
    return f'<figure id="fig-{_esc(plot.name)}">{_img(plot)}{cap}</figure>'


def markdown_to_html(text: str) -> str:
    """The small Markdown the study tables use (paragraphs, pipe tables, `code`) as HTML."""
    out: list[str] = []
    rows: list[list[str]] = []

    def cell(c: str) -> str:
        parts = _esc(c.strip()).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    def flush() -> None:
        if rows:
            head, body = rows[0], rows[2:]
            out.append("<table><tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>"
                       for r in body)
            out.append("</table>")
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(line.strip().strip("|").split("|"))
            continue
        flush()
        if line.strip() and not line.startswith("!["):
            out.append(f"<p>{cell(line)}</p>")
    flush()
    return "\n".join(out)


def render_html(r: Report) -> str:
    """The report as one HTML page with every image inline: it opens offline, alone."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_esc(r.title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{_esc(r.title)}</h1>", "<ul>"]
    out += [f"<li><b>{_esc(k)}:</b> {_esc(v)}</li>" for k, v in r.facts]
    out += ["</ul>", '<h2 id="accuracy">Accuracy</h2>', _html_table(r.accuracy)]
    if r.comparison is not None:
        out += ['<h2 id="comparison">Comparison</h2>',
                '<p class="note">Δ = this run − the other run, in percentage points.</p>',
                _html_table(r.comparison)]
    out.append('<h2 id="curves">Training curves</h2>')
    out += [_html_figure(p) for p in r.curves] or ['<p class="note">no per-epoch history</p>']
    out.append('<h2 id="codebook">Codebook</h2>')
    if r.codebook is not None:
        out.append(_html_table(r.codebook))
    if r.codebook_plot is not None:
        out.append(_html_figure(r.codebook_plot))
    if r.codebook_note:
        out.append(f'<p class="note">{_esc(r.codebook_note)}</p>')
    out.append('<h2 id="gallery">Visual-word gallery</h2>')
    if r.gallery_note:
        out.append(f'<p class="note">{_esc(r.gallery_note)}</p>')
    if r.gallery_plots:
        out.append('<div class="words">')
        for p in r.gallery_plots:
            out.append(f'<div class="word" id="word-{_esc(p.name)}">{_img(p)}'
                       f"<div>{_esc(p.caption)}</div></div>")
        out.append("</div>")
    if r.studies:
        out.append('<h2 id="studies">When does QuEST help? (studies)</h2>')
        for name, description, body, plots in r.studies:
            out += [f"<h3>{_esc(name)}</h3>"]
            out += [f'<p class="note">{_esc(para)}</p>' for para in description.split("\n\n")]
            out.append(markdown_to_html(body))
            out += [_html_figure(plot) for plot in plots]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_table(t: Table) -> str:
    align = ["---:" if n else "---" for n in t.numeric]
    lines = ["| " + " | ".join(t.header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(r: Report, figures_dir: str = "figures") -> str:
    """The report as Markdown; images are links to the PNG files written beside it."""
    def link(p: Plot) -> str:
        return f"![{p.title}]({figures_dir}/{p.name}.png)"

    out = [f"# {r.title}", ""]
    out += [f"- **{k}:** {v}" for k, v in r.facts]
    out += ["", "## Accuracy", "", _md_table(r.accuracy), ""]
    if r.comparison is not None:
        out += ["## Comparison", "", "Δ = this run − the other run, in percentage points.", "",
                _md_table(r.comparison), ""]
    out += ["## Training curves", ""]
    for p in r.curves:
        out += [link(p), "", f"*{p.caption or p.title}*", ""]
    out += ["## Codebook", ""]
    if r.codebook is not None:
        out += [_md_table(r.codebook), ""]
    if r.codebook_plot is not None:
        out += [link(r.codebook_plot), ""]
    if r.codebook_note:
        out += [r.codebook_note, ""]
    out += ["## Visual-word gallery", ""]
    if r.gallery_note:
        out += [r.gallery_note, ""]
    for p in r.gallery_plots:
        out += [f"**{p.caption}**", "", link(p), ""]
    if r.studies:
        out += ["## When does QuEST help? (studies)", ""]
        for name, description, body, plots in r.studies:
            out += [f"### {name}", "", description, "", body, ""]
            for plot in plots:
                out += [link(plot), ""]
    return "\n".join(out)
