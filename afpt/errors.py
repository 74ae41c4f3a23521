"""The exception types for input a user must fix: a config key, a file, or a value."""


class AfptError(ValueError):
    """Bad input, reported in one line that names the key, file or value and what was expected."""


class DataError(AfptError):
    """A corpus, file or data option that cannot be used, with the key or file that caused it."""
