"""Exceptions of the data pipeline. All derive from :class:`DataError` so CLIs can print one clear line."""

from __future__ import annotations

from megatron.errors import RunError, UserInputError


class DataError(UserInputError, ValueError):
    """Base class: bad data input, named by file/key/value (exit 2)."""


class IndexedDatasetError(DataError):
    """A ``.bin/.idx`` pair is missing, corrupt, truncated or inconsistent."""


class CorpusError(DataError):
    """A named corpus is unknown, or its shipped folder is missing."""


class CorpusFetchError(RunError, CorpusError):
    """Downloading or unpacking a known corpus failed (network, a broken archive): the run failed (exit 1)."""


class PrepareError(DataError):
    """Raw text / JSONL input could not be turned into a tokenized dataset."""
