"""`quest run` resumes the pipeline: a finished stage is skipped while nothing it read changed.

After a stage (or a suite) finishes, `quest run` writes ``.quest/stages/<label>.json`` with the
stage's key (quest/apps/stages/keys.py: the values of the settings it reads, the content of
the files it reads and its code, the same key that Prefect caches on and that DVC's deps and
params mirror) and the digests of the files it wrote. On the next run the stage is skipped,
with one log line, when its key is the recorded one and its outputs are still those files;
otherwise it runs (a student killed mid-training resumes from its epoch checkpoint) and its
record is rewritten. ``quest run --force`` runs every stage and rewrites every record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quest.apps.stage_table import Key, Stage
from quest.apps.stages.keys import output_digests, outputs_match, outputs_present, stage_key_for
from quest.infra.config import Config
from quest.infra.io_utils import read_json, write_json_atomic
from quest.infra.paths import Paths


def record_dir(paths: Paths) -> Path:
    """Where `quest run` records each finished stage's key (git-ignored, like all of .quest/)."""
    return paths.root / ".quest" / "stages"


def _label(spec: Stage, key: Key) -> str:
    return spec.name if key is None else f"{spec.name}[{key}]"


class StageRecords:
    """Decides, stage by stage, whether `quest run` can skip it; records what it ran."""

    def __init__(self, cfg: Config, paths: Paths, force: bool = False) -> None:
        self.cfg, self.paths, self.force = cfg, paths, force
        self.skipped: list[str] = []

    def _file(self, spec: Stage, key: Key) -> Path:
        name = _label(spec, key).replace("/", "_")
        return record_dir(self.paths) / f"{name}.json"

    def key(self, spec: Stage, key: Key) -> str:
        """The stage's key now (its inputs must exist: call it before the stage runs)."""
        return stage_key_for(spec.family, self.cfg, self.paths,
                             spec.suite if spec.suite is not None else key)

    def fresh(self, spec: Stage, key: Key, now: str) -> bool:
        """Whether the stage's outputs exist and were written from inputs of key `now`."""
        if self.force:
            return False
        method = spec.suite if spec.suite is not None else key
        if not outputs_present(spec.family, self.paths, method):
            return False
        try:
            record = read_json(self._file(spec, key))
        except (OSError, ValueError):
            return False
        if not isinstance(record, dict) or record.get("key") != now:
            return False
        if outputs_match(record, self.paths):
            self.skipped.append(_label(spec, key))
            return True
        return False

    def done(self, spec: Stage, key: Key, now: str) -> None:
        """Record that the stage ran from inputs of key `now`, and the files it wrote."""
        method = spec.suite if spec.suite is not None else key
        record: dict[str, Any] = {"stage": spec.name, "key_of": method, "key": now,
                                  "outputs": output_digests(spec.family, self.paths, method)}
        write_json_atomic(self._file(spec, key), record)
