"""The data path's one user-facing error type (the CLI prints it as one line)."""


class DataError(ValueError):
    """Bad input data or shards: the message names the file (and key) and the problem."""
