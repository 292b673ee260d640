"""Errors offload raises for the user to act on. Each message says what is wrong and, where it can, what to change.

offload depends on no application code, so these do not derive from k2local's K2Error; k2local shows them the same
way (one line, exit status 2): see k2local.errors.USER_ERRORS.
"""


class OffloadError(Exception):
    """Base class: an error meant to be shown to the user as a one-line message, never a traceback."""


class PlanError(OffloadError):
    """The model cannot be placed within the memory budgets; the message says what to change."""


class ExpertReadError(OffloadError):
    """Routed-expert bytes cannot be located or read (a file missing, unreadable or truncated)."""
