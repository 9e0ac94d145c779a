"""The engine's user-facing error type, in a module of its own so that every layer of the
engine (and `python -m echofm.engine.cli`, which runs cli.py as `__main__`) shares one class."""


class UserError(Exception):
    """An error the user can fix (bad checkpoint, bad run folder, ...): the CLI prints it as
    one line and exits with status 2."""
