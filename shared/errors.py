"""The errors a user can cause, at the bottom of the stack so that every layer can raise them.

A :class:`UserFacingError`'s message is the whole story: the CLI prints it as one line, without a
traceback. Each message names the file or key and the reason.
"""

from __future__ import annotations


class UserFacingError(RuntimeError):
    """Bad input or a missing file: the message names it and says what to do."""


class ConfigError(UserFacingError, ValueError):
    """A config key or value is wrong; the message names the key."""


class ManifestError(UserFacingError, ValueError):
    """A manifest or shard that must not be read (missing, bad checksum, unsafe member, version)."""
