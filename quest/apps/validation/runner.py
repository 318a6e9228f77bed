"""Run a suite with Great Expectations 1.x; write the JSON report, Data Docs and the pass gate."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np

from quest.apps.stage_table import report_files
from quest.apps.validation import SUITES
from quest.apps.validation.docs_views import site_config
from quest.apps.validation.suites import BUILDERS, Suite, Table
from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.io_utils import write_json_atomic
from quest.infra.paths import Paths
from quest.infra.progress import log

_SITE = "quest"
# failing rows listed per expectation in the report (GX's partial_unexpected_count)
_EXAMPLES = 5
# GX's tutorial animations: 3.4 MB of every site that no validation page references; dropped so
# the reports stay small in DVC's cache and as MLflow artifacts
_UNUSED_STATIC = ("glossary_scroller.gif", "validation_failed_unexpected_values.gif",
                  "iterative-dev-loop.png")


def _plain(obj: Any) -> Any:
    """GX results as plain JSON: numpy scalars to Python, non-finite floats to strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value)


def _detail(result: dict[str, Any]) -> str:
    """What a failed expectation saw, in a few words (counts and the first failing rows)."""
    if result.get("unexpected_count") is not None and result.get("element_count") is not None:
        rows = result.get("partial_unexpected_index_list") or result.get(
            "partial_unexpected_list") or []
        examples = ", ".join(_short(r) for r in rows[:3])
        return (f"{result['unexpected_count']} of {result['element_count']} rows fail"
                + (f", e.g. {examples}" if examples else ""))
    if "observed_value" in result:
        return f"observed {_short(result['observed_value'])}"
    return "failed"


def _run_table(context: Any, what: str, table: Table) -> list[dict[str, Any]]:
    """Validate one table through a Checkpoint that also renders it into the Data Docs site."""
    source = context.data_sources.add_pandas(f"{what}.{table.name}")
    batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{what}.{table.name}"))
    for exp in table.expectations:
        suite.add_expectation(exp)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{what}.{table.name}", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"{what}.{table.name}", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[_SITE])],
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": _EXAMPLES,
                       "unexpected_index_column_names": table.index_columns}))
    outcome = checkpoint.run(batch_parameters={"dataframe": table.frame})
    records = []
    for run in outcome.run_results.values():
        for res in run.results:
            cfg = res.expectation_config
            kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
            records.append(_plain({
                "table": table.name,
                "expectation": cfg.type,
                "description": cfg.description or cfg.type,
                "kwargs": kwargs,
                "success": bool(res.success),
                "result": {k: v for k, v in (res.result or {}).items()
                           if k not in ("unexpected_list", "unexpected_index_list",
                                        "unexpected_index_query")},
                "exception": (res.exception_info or {}).get("exception_message")
                if isinstance(res.exception_info, dict) else None,
            }))
    return records


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished directory onto `target`: the old one is renamed away, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _quiet_gx() -> None:
    # GX logs every store and renderer step at INFO/WARNING; the report says what matters
    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def run_suite(what: str, suite: Suite, paths: Paths, thresholds: dict[str, Any]) -> dict[str, Any]:
    """Validate a built suite, write reports/validation/<what>.*; raise on any failure."""
    t0 = time.perf_counter()
    files = report_files(paths, what)
    # the gate never outlives a new verdict: a failed or interrupted run leaves no pass behind
    files["passed"].unlink(missing_ok=True)
    files["docs"].parent.mkdir(parents=True, exist_ok=True)
    _quiet_gx()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    tmp_docs = Path(tempfile.mkdtemp(prefix=f".{what}.", suffix=".tmp", dir=files["docs"].parent))
    try:
        context.add_data_docs_site(_SITE, site_config(str(tmp_docs)))
        records: list[dict[str, Any]] = []
        for table in suite.tables:
            records += _run_table(context, what, table)
        for name in _UNUSED_STATIC:
            (tmp_docs / "static" / "images" / name).unlink(missing_ok=True)
        _replace_dir(tmp_docs, files["docs"])
    finally:
        shutil.rmtree(tmp_docs, ignore_errors=True)
    failed = [r for r in records if not r["success"]]
    report = {
        "suite": what,
        "after_stage": SUITES[what],
        "success": not failed,
        "evaluated": len(records),
        "passed": len(records) - len(failed),
        "failed": len(failed),
        "failures": [f"{r['table']}: {r['description']} ({_detail(r['result'])})"
                     for r in failed],
        "thresholds": thresholds,
        "observed": _plain(suite.observed),
        "inputs": suite.inputs,
        "expectations": records,
        "data_docs": (files["docs"] / "index.html").relative_to(paths.root).as_posix(),
        "great_expectations": gx.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json_atomic(files["report"], report)
    rel = files["report"].relative_to(paths.root).as_posix()
    if failed:
        raise QuestError(
            f"{what} validation failed {len(failed)} of {len(records)} expectations: "
            + "; ".join(report["failures"])
            + f". Details: {rel} and {report['data_docs']}; fix the {SUITES[what]} output "
            f"or adjust validation.{what}.* in params.yaml")
    # the gate holds only the hashes of what passed: threshold edits that still pass change
    # nothing downstream, so DVC does not rerun the expensive stages behind it
    write_json_atomic(files["passed"], {"suite": what, "inputs": suite.inputs})
    log.info("%s validation: %d of %d expectations passed (%s)", what, len(records),
             len(records), rel)
    return report


def validate(what: str, cfg: Config, paths: Paths) -> dict[str, Any]:
    """Build the named suite from the stage outputs under paths and run it."""
    suite = BUILDERS[what](cfg, paths)
    thresholds = cfg.to_dict()["validation"][what]
    return run_suite(what, suite, paths, thresholds)
