"""User-facing errors.

Every problem a user can cause (a bad recipe, a bad data file, an unknown name, an unusable checkpoint) is
raised as a ``PrefoptError`` whose message says what is wrong and where. The CLI prints the message and exits 2,
never a traceback. A subclass may set ``exit_code`` (a non-finite stop: 3; a signal: 128 + its number) and
``label`` (the word after ``prefopt:``, "error" by default).
"""


class PrefoptError(Exception):
    """An error in the user's input: config, data, names. Printed without a traceback."""


class ConfigError(PrefoptError):
    """A recipe or override is invalid (unknown key, wrong type, out-of-range value)."""


class DataError(PrefoptError):
    """A data file cannot be used (missing, wrong format, truncated, or nothing usable in it)."""


class CheckpointError(PrefoptError):
    """A checkpoint cannot be resumed from (a file missing, unreadable, or not this run's model/optimizer)."""


class UnknownNameError(PrefoptError, KeyError):
    """A registry lookup failed; the message lists the known names and the closest match."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])
