"""User-facing errors.

Anything the user can cause (a bad file, a bad flag, a prompt that does not fit) raises a
`TinyVilaError` subclass whose message is one clear line. The CLIs print that line and exit
with status 2; library users catch the class. Bugs stay ordinary exceptions with tracebacks.

This module imports no torch: every command line imports it before parsing its arguments.
"""
import os
import re
import signal
import sys


class TinyVilaError(Exception):
    """Base class: the message is shown to the user as is, on one line."""


class MediaError(TinyVilaError):
    """A missing, unreadable, corrupt or oversized image or video."""


class CheckpointError(TinyVilaError):
    """A missing, malformed or unsupported model directory or weight file."""


class ContextError(TinyVilaError):
    """A prompt or conversation that does not fit in the context window."""


# What to lower when memory runs out, unless a command line knows better.
LOWER_MEMORY = "lower --max-seq-len, the image size (--max-pixels) or the number of frames, or use a smaller model"


def check_output_file(path, option: str, suffixes=None, example: str = "") -> None:
    """An output file the command will write: its folder must exist and be writable, and it must
    not be a folder itself; `suffixes` (lower case, with the dot) are the accepted extensions."""
    target = os.path.abspath(os.path.expanduser(str(path)))
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise TinyVilaError(f"{option}: no folder '{folder}'")
    if os.path.isdir(target):
        raise TinyVilaError(f"{option}: '{path}' is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise TinyVilaError(f"{option}: cannot write to the folder '{folder}' (permission denied)")
    if suffixes is not None and os.path.splitext(target)[1].lower() not in suffixes:
        raise TinyVilaError(f"{option}: '{path}' is not a file name it can write (say {example})")


def out_of_memory(error: BaseException, lower: str = LOWER_MEMORY) -> str | None:
    """One line for an out-of-memory error (how much was asked for, what to lower), else None.

    torch reports a GPU shortage as torch.OutOfMemoryError ("Tried to allocate 2.00 GiB") and a host
    shortage as a RuntimeError from its DefaultCPUAllocator ("you tried to allocate N bytes")."""
    torch = sys.modules.get("torch")  # only loaded modules can have raised: never import torch here
    text = str(error)
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
        return f"out of GPU memory{f' (tried to allocate {asked[1]})' if asked else ''}; {lower}"
    if isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in text:
        asked = re.search(r"tried to allocate (\d+) bytes", text)
        size = f" (tried to allocate {int(asked[1]) / 2**30:.1f} GiB)" if asked else ""
        return f"out of CPU memory{size}; {lower}"
    if isinstance(error, MemoryError):
        return f"out of memory; {lower}"
    return None


def exit_on_broken_pipe() -> None:
    """The reader of stdout went away (`| head`): end as coreutils do, killed by SIGPIPE, silently.
    stdout now points at /dev/null so that the interpreter's last flush has nowhere to fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)


def run_cli(body, debug: bool = False, lower: str = LOWER_MEMORY) -> int:
    """Run a command line's body: a user error or running out of memory prints one `error:` line
    and gives status 2 (a traceback only with --debug), a closed stdout ends quietly as on SIGPIPE,
    and Ctrl+C gives 130. `lower` says what to reduce when memory runs out."""
    try:
        try:
            body()
            if sys.stdout is not None:
                sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        except BaseException as e:
            message = out_of_memory(e, lower)
            if message is None:
                raise
            raise TinyVilaError(message) from e
    except TinyVilaError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        exit_on_broken_pipe()
    except KeyboardInterrupt:
        return 130
    return 0
