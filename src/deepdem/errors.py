"""Exceptions that say what is wrong and with which file.

Every user-facing failure is a :class:`DeepDEMError` whose message is one line of the form
``"<file>: <problem>"``; the command line prints it and exits with status 2.
"""

from __future__ import annotations

from os import PathLike


class DeepDEMError(Exception):
    """A problem with the user's input (file, argument, checkpoint), reported in one line."""

    def __init__(self, message: str, path: str | PathLike | None = None):
        self.path = None if path is None else str(path)
        text = " ".join(str(message).split())  # one line, always
        super().__init__(f"{self.path}: {text}" if self.path else text)


class InputError(DeepDEMError):
    """An input file is missing, unreadable, or holds data that cannot be used."""


class GridError(DeepDEMError):
    """Rasters do not share a grid or do not overlap."""


class CheckpointError(DeepDEMError):
    """A checkpoint is unreadable, unsafe, or does not match the scene."""
