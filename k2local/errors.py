"""User-facing errors: each message names the file (or input) and what is wrong with it."""
from offload.errors import OffloadError


class K2Error(Exception):
    """Base class for errors shown to the user as a one-line message, never a traceback."""


class CheckpointError(K2Error):
    """A checkpoint (directory, shard, GGUF, config) is missing, truncated or inconsistent."""


# Every error shown to the user as one line (exit status 2 from the CLI): k2local's own, and offload's (a plan that
# cannot fit, expert bytes that cannot be read), which derive from offload.errors.OffloadError since offload does
# not depend on k2local. Catch this tuple, not K2Error alone, wherever a user error ends a command or a turn.
USER_ERRORS: tuple[type[Exception], ...] = (K2Error, OffloadError)
