"""The one exception type of the config system, so callers can catch config mistakes apart from bugs."""

from __future__ import annotations

from typing import Callable

from megatron.errors import UserInputError

#: names the source of a config key in messages ("run.yml", "--override", ...)
Where = Callable[[str], str]


def unknown_source(key: str) -> str:
    """The ``Where`` of a config built in code (no file to name)."""
    return "config"


class ConfigError(UserInputError):
    """A config file, key or value that cannot be used. The message names the source, the key and what was expected."""
