"""`quest torchrun`: torchrun around a stage command, with a user's error in one line.

Under plain `torchrun -m quest ...` a rank that stops on a QuestError prints its one line, and
then torchrun's own agent prints a ChildFailedError block (a traceback of the launcher, a table
of failed ranks) from another process. This wrapper runs the same torchrun, passes every line of
the ranks' output through as it comes, keeps the ranks' `quest: error:` lines, drops what follows
the first of them (the agent's block, the other ranks' copies) and ends with that one line and
exit code 2. A failure that is not a QuestError (a crash) passes through untouched.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from quest.infra.errors import QuestError

ERROR_PREFIX = "quest: error: "


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's options and the stage command, from `[OPTIONS...] -- STAGE [ARGS...]`."""
    if "--" not in argv:
        raise QuestError("quest torchrun needs its stage command after `--`, e.g. `quest torchrun "
                         "--standalone --nproc_per_node 2 -- student --method quest`")
    i = argv.index("--")
    opts, stage = argv[:i], argv[i + 1:]
    if not stage:
        raise QuestError("quest torchrun: name the stage command after `--` (e.g. student)")
    return opts, stage


def filter_rank_output(lines: Iterable[str], out: TextIO) -> Iterator[str]:
    """Write the lines to `out` until a rank's `quest: error:` line; yield the error messages
    (the text after the prefix, in order) and write nothing after the first of them."""
    failed = False
    for line in lines:
        at = line.find(ERROR_PREFIX)
        if at >= 0:
            failed = True
            yield line[at + len(ERROR_PREFIX):].rstrip("\n")
        elif not failed:
            out.write(line)
            out.flush()


def run_torchrun(argv: list[str]) -> int:
    """Run `python -m torch.distributed.run OPTIONS -m quest STAGE ARGS`; a user's error in any
    rank becomes one line on stderr and exit code 2."""
    opts, stage = split_command(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", *opts, "-m", "quest", *stage]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stderr is not None
    errors = list(filter_rank_output(proc.stderr, sys.stderr))
    rc = proc.wait()
    if rc == 0:
        return 0
    if errors:
        print(ERROR_PREFIX + errors[0], file=sys.stderr)
        return 2
    return rc
