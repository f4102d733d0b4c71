"""Exceptions shared across layers (imports nothing, so any module may use them)."""


class UserError(Exception):
    """A problem the user can fix (bad flags, a logdir holding another run, an unusable combination of
    settings). Entry points print it as ONE line, `error: ...`, and exit with code 1."""
