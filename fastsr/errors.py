"""Exceptions that carry a user-facing, one-line message.

The command line prints `str(err)` of these without a traceback; anything else that
escapes is a bug in fastsr and keeps its traceback.
"""


class FastSRError(Exception):
    """Base class: a problem with the user's input, files or request."""


class CheckpointError(FastSRError):
    """A checkpoint file is unreadable, unsafe, or does not match the model."""


class ImageReadError(FastSRError):
    """An image file cannot be read (missing, corrupt, unsupported, too large)."""


class BackendUnavailable(FastSRError):
    """A fused backend was requested by name and cannot run here; the message says why."""
