"""User-facing errors.

Anything the user can cause (a bad file, a bad flag, a prompt that does not fit) raises a
`TinyVilaError` subclass whose message is one clear line. The CLIs print that line and exit
with status 2; library users catch the class. Bugs stay ordinary exceptions with tracebacks.
"""


class TinyVilaError(Exception):
    """Base class: the message is shown to the user as is, on one line."""


class MediaError(TinyVilaError):
    """A missing, unreadable, corrupt or oversized image or video."""


class CheckpointError(TinyVilaError):
    """A missing, malformed or unsupported model directory or weight file."""


class ContextError(TinyVilaError):
    """A prompt or conversation that does not fit in the context window."""


def run_cli(body, debug: bool, out_of_memory: str) -> int:
    """Run a command line's body: a user error prints one `error:` line and gives status 2 (a
    traceback only with --debug), running out of GPU memory is such an error (with a hint), and
    Ctrl+C gives 130."""
    import sys

    import torch

    try:
        try:
            body()
        except torch.cuda.OutOfMemoryError:
            raise TinyVilaError(f"out of GPU memory; {out_of_memory}")
    except TinyVilaError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
