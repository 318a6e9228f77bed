"""`python -m quest ...` is the `quest` command (for machines without the console script)."""

from quest.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
