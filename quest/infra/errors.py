"""User-facing errors: one line that names the problem and the fix."""


class QuestError(Exception):
    """An error caused by input or configuration; the CLI prints its message as one line."""


# torch re-raises a DataLoader worker's exception in the main process as the same type with
# this wrapper: "Caught QuestError in DataLoader worker process 0.\nOriginal Traceback ...";
# Prefect and Dask keep the exception itself, but a message may still span lines
_WORKER_WRAPPER = "Original Traceback (most recent call last):"


def one_line(exc: BaseException) -> str:
    """The message of a user error as one line, whichever process raised it: a DataLoader
    worker's wrapper and traceback are dropped, leaving the original message."""
    msg = str(exc)
    if _WORKER_WRAPPER in msg:
        lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else msg
        name = type(exc).__name__
        # the traceback's last line is "<module>.<Name>: message"
        head, sep, tail = last.partition(f"{name}: ")
        msg = tail if sep and "." in head + "." else last
    return " ".join(msg.split())
