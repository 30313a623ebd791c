"""User-facing errors: each message says what went wrong, where, and what to do."""


class RLCircuitsError(Exception):
    """Base class; the CLI prints the message (no traceback) and exits with status 2."""


class CheckpointError(RLCircuitsError):
    """A model checkpoint cannot be found, read or converted."""


class ConfigError(RLCircuitsError):
    """A run config or pair registry entry is invalid."""


class DataError(RLCircuitsError):
    """A dataset file or stored record is malformed."""


class NumericalError(RLCircuitsError):
    """A loss or score is NaN or infinite."""


class SelectionError(RLCircuitsError):
    """No question survives the selection filters."""


class StoreError(RLCircuitsError):
    """A run directory cannot be written or read (disk full, path outside the run, closed store)."""


class LockedError(StoreError):
    """Another process (or another open store in this one) holds the run directory's lock."""


class RLCircuitsWarning(UserWarning):
    """Input that works but is probably not what the user meant; the CLI prints the message on
    one line as ``warning: ...``."""
