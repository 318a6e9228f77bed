"""Data Docs views that compile GX's page templates once per process.

GX builds a new jinja2 Environment, and so recompiles every template, for each page it renders:
about 50 compiles per validated table, most of a suite's CPU time on small tables
(benchmarks/data_docs.py). These views render
exactly as GX's own (same classes, same templates, same filters) but keep one Environment per
view class, so a template is compiled the first time it is used and reused afterwards. The
filters GX binds to the first instance read no per-instance state except the custom style and
view folders, which quest never sets.
"""

from __future__ import annotations

from typing import Any, ClassVar

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView

MODULE = __name__


class _SharedEnvironment:
    """Mixin: the first instance's jinja2 Environment serves every later instance."""

    _environments: ClassVar[dict[type, Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.env = _SharedEnvironment._environments.setdefault(type(self), self.env)


class PageView(_SharedEnvironment, DefaultJinjaPageView):
    """GX's page view (suite and validation pages) with a per-process template cache."""


class IndexPageView(_SharedEnvironment, DefaultJinjaIndexPageView):
    """GX's index page view with a per-process template cache."""


def gx_site(base_directory: str) -> dict[str, Any]:
    """GX's own Data Docs site under base_directory: its default views, a new Environment per
    page (what site_config replaces; benchmarks/data_docs.py and the tests compare the two)."""
    return {"class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": base_directory},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}


def site_config(base_directory: str) -> dict[str, Any]:
    """GX's site under base_directory with its pages rendered through these views."""
    page = {"module_name": MODULE, "class_name": "PageView"}
    site = gx_site(base_directory)
    site["site_index_builder"]["view"] = {"module_name": MODULE, "class_name": "IndexPageView"}
    site["site_section_builders"] = {"expectations": {"view": page}, "validations": {"view": page}}
    return site
