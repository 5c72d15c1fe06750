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
