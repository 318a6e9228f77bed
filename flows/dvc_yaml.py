"""dvc.yaml from the stage table: each stage's cmd, deps, params and outs are rewritten from
quest/apps/stage_table.py, keeping the file's comments, order and everything else (metrics, plots).

Code deps are the stage's import closure, the same files whose content is in its Prefect cache
key (flows/cache.py `code_files`), a package directory standing for all of its files when the
closure holds every one of them. So DVC and Prefect rerun a stage for the same edits.

    python -m flows.dvc_yaml            # rewrite dvc.yaml
    python -m flows.dvc_yaml --check    # exit 1 when dvc.yaml differs from the table
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from flows.cache import code_files
from quest.apps.stage_table import STAGES, Stage
from quest.apps.stages.dvc_file import stage_data_entry

REPO = Path(__file__).resolve().parents[1]


def _compress(files: tuple[str, ...]) -> list[str]:
    """Closure files, a directory of quest/ listed instead of its files when all are in."""
    chosen = set(files)
    out: set[str] = set(files)
    dirs = sorted({str(Path(f).parent) for f in files if Path(f).parent != Path("quest")},
                  key=lambda d: d.count("/"))
    for d in dirs:
        every = {p.relative_to(REPO).as_posix() for p in (REPO / d).rglob("*.py")
                 if "__pycache__" not in p.parts}
        if every and every <= chosen and not any(d.startswith(o + "/") for o in out):
            out -= every
            out.add(d)
    return sorted(out)


def stage_entry(spec: Stage) -> dict[str, Any]:
    """cmd, deps, params and outs of one stage as dvc.yaml lists them: the table's data deps
    (quest/apps/stages/dvc_file.py, also what `quest init` writes), then the code deps."""
    entry = stage_data_entry(spec)
    entry["deps"] = entry["deps"] + _compress(code_files(spec.code))
    return entry


def render(text: str) -> str:
    """dvc.yaml's text with every table stage's cmd, deps, params and outs regenerated."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    yaml = YAML()
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(text)
    stages = doc["stages"]
    for spec in STAGES:
        if spec.name not in stages:
            raise SystemExit(f"dvc.yaml has no stage {spec.name!r}: add it (the table has it)")
        body = stages[spec.name]
        body = body["do"] if "do" in body else body
        for field, value in stage_entry(spec).items():
            if field == "cmd":
                body[field] = value
                continue
            seq = body.get(field)
            if not isinstance(seq, CommentedSeq):
                body[field] = seq = CommentedSeq()
            # a comment (and blank lines) after the list belong to its last item: keep them
            trailing = seq.ca.items.pop(len(seq) - 1, None) if len(seq) else None
            seq.ca.items.clear()
            seq[:] = value
            if trailing is not None:
                seq.ca.items[len(seq) - 1] = trailing
    extra = set(stages) - {s.name for s in STAGES}
    if extra:
        raise SystemExit(f"dvc.yaml has stages the table lacks: {sorted(extra)}")
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Rewrite dvc.yaml, or with --check report whether it is current."""
    ap = argparse.ArgumentParser(prog="python -m flows.dvc_yaml", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml is stale")
    ap.add_argument("--file", default=str(REPO / "dvc.yaml"))
    args = ap.parse_args(argv)
    path = Path(args.file)
    old = path.read_text(encoding="utf-8")
    new = render(old)
    if args.check:
        if new != old:
            print(f"{path} differs from the stage table: run `python -m flows.dvc_yaml`",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        from quest.infra.io_utils import write_text_atomic

        write_text_atomic(path, new)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
