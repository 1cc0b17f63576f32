"""Exceptions a user can act on.

Every error raised because of bad input or usage derives from CifarlabError; the
CLI prints its message (no traceback unless --debug) and exits with status 2.
Messages say what was expected, what was given, and what to do.
"""


class CifarlabError(Exception):
    """Bad input or usage that the user can fix."""


class DataError(CifarlabError):
    """A dataset could not be found, read or verified."""


class ChecksumError(DataError):
    """A downloaded or local archive does not match its published checksum."""


class InputError(CifarlabError):
    """Arrays given to a model or a metric are not what it expects."""


class ModelFileError(CifarlabError):
    """A model or checkpoint file is missing, corrupt or of an unknown format."""
