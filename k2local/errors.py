"""User-facing errors: each message names the file (or input) and what is wrong with it."""


class K2Error(Exception):
    """Base class for errors shown to the user as a one-line message, never a traceback."""


class CheckpointError(K2Error):
    """A checkpoint (directory, shard, GGUF, config) is missing, truncated or inconsistent."""
