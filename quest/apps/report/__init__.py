"""The run report: an offline HTML page and a Markdown summary built from a finished run's files.

An outer layer: matplotlib is imported lazily (Agg, no pyplot state), only while figures are drawn,
so the core and the CLI import without it.
"""

from __future__ import annotations

from quest.apps.report.build import run_report

__all__ = ["run_report"]
