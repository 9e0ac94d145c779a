"""The engine's user-facing errors, in a leaf module (it imports nothing) so that every module
of the engine (and `python -m echofm.engine.cli`, which runs cli.py as `__main__`) shares one
class of each. The CLI prints any of them as one line `echofm: error: ...` and exits 2.
"""


class UserError(Exception):
    """An error the user can fix (bad checkpoint, bad run folder, ...)."""


class ConfigError(UserError, ValueError):
    """A recipe problem, already phrased for the user: file, key path, what is valid."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: damaged, unsafe, of another format or model, not
    written, or not fitting the model; the message names the file (and the keys)."""


class NonFiniteLoss(UserError):
    """The loss stayed non-finite for `train.max_nonfinite` micro-batches in a row."""
