"""Errors a user can fix. The CLI prints them as one line (no traceback) and exits with 2."""


class UserError(Exception):
    """Bad input: a config key, a data line, a path. The message says where and what is right."""


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type or out of range."""


class DataError(UserError):
    """A data file that is missing, empty, not UTF-8, or has a bad line (file:line in message)."""
