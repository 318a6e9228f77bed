"""Great Expectations suites that gate the pipeline: data, teacher features, codebook, predictions.

An outer layer like quest/tracking: Great Expectations and pandas are imported only inside the
functions that run a suite, so importing this package (or the CLI) stays cheap and GX-free.
Each suite writes ``reports/validation/<what>.json``, Data Docs HTML under
``reports/validation/docs/<what>/`` and, when it passes, the gate file
``reports/validation/<what>.passed`` that the next DVC stage depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.paths import Paths

# suite -> the stage whose output it checks (the pipeline runs the suite right after it)
SUITES: dict[str, str] = {
    "data": "prepare",
    "features": "features",
    "codebook": "codebook",
    "predictions": "evaluate",
}


def run_validation(what: str, cfg: Config, paths: Paths) -> dict[str, Any]:
    """Run one suite, write its reports; raise a one-line QuestError listing failures."""
    if what not in SUITES:
        raise QuestError(f"unknown validation '{what}': choose one of {', '.join(SUITES)}")
    try:
        from quest.apps.validation.runner import validate
    except ImportError as exc:
        raise QuestError(f"validation needs great-expectations and pandas ({exc}): "
                         "pip install -e '.[pipeline]', or skip it with `quest run --no-validate`"
                         ) from None
    return validate(what, cfg, paths)


def pipeline_checks(cfg: Config, paths: Paths) -> dict[str, Callable[[], None]]:
    """The `checks` hook of run_pipeline: stage name -> the suite that gates what follows it."""

    def check(what: str) -> Callable[[], None]:
        def run() -> None:
            run_validation(what, cfg, paths)

        run.__name__ = f"validate_{what}"
        return run

    return {stage: check(what) for what, stage in SUITES.items()}
