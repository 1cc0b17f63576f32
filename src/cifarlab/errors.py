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


class ImageDecodeError(DataError):
    """An image file cannot be decoded: corrupt, truncated, of a refused format, or a decompression bomb."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"Cannot decode the image {where}: {reason}. Remove or replace the file, or pass "
                         "--bad-images skip to leave out (and list) the images that cannot be decoded.")
        self.where, self.reason = where, reason

    def __reduce__(self):  # rebuilt from (where, reason) when sent back from a decoding worker process
        return type(self), (self.where, self.reason)


class InputError(CifarlabError):
    """Arrays given to a model or a metric are not what it expects."""


class ModelFileError(CifarlabError):
    """A model or checkpoint file is missing, corrupt or of an unknown format."""


class StorageError(CifarlabError):
    """A file could not be written (disk full, quota, file-size limit, permissions).

    Raised only after the write was undone: the previous version of the file, if any, is intact.
    `path` is the file that could not be written, when known.
    """

    def __init__(self, message: str, path: object = None):
        super().__init__(message)
        self.path = path


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, with the run folder, so the message can give the exact
    `--resume` command (or say that no epoch has ended yet, so there is nothing to resume)."""

    def __init__(self, run_dir: object, has_checkpoint: bool):
        super().__init__(str(run_dir))
        self.run_dir, self.has_checkpoint = run_dir, has_checkpoint

    def hint(self) -> str:
        if self.has_checkpoint:
            return f"continue with: cifarlab train --resume {self.run_dir}"
        return (f"no epoch had ended, so {self.run_dir} holds no checkpoint to resume; start again "
                "with `cifarlab train` (and --overwrite for the same --out)")
