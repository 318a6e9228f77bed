"""User-facing errors: one line that names the problem and the fix."""


class QuestError(Exception):
    """An error caused by input or configuration; the CLI prints its message as one line."""
