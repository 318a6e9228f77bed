"""Regenerate the README's results table from results/*.json (mean ± std over seeds).

    python scripts/results_table.py           # rewrite the table in README.md
    python scripts/results_table.py --check   # exit 1 if README.md's table is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quest.io_utils import write_text_atomic
from quest.results import load_records, replace_table, results_table

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, verify) the README table; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only verify the README is up to date")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args(argv)
    readme = args.readme.read_text()
    updated = replace_table(readme, results_table(load_records(args.results)))
    if args.check:
        if updated != readme:
            print(f"{args.readme}: results table is stale: run python scripts/results_table.py",
                  file=sys.stderr)
            return 1
        return 0
    if updated != readme:
        write_text_atomic(args.readme, updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
