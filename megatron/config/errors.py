"""The one exception type of the config system, so callers can catch config mistakes apart from bugs."""

from __future__ import annotations

from megatron.errors import UserInputError


class ConfigError(UserInputError):
    """A config file, key or value that cannot be used. The message names the source, the key and what was expected."""
