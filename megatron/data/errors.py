"""Exceptions of the data pipeline. All derive from :class:`DataError` so CLIs can print one clear line."""

from __future__ import annotations

from megatron.errors import RunError


class DataError(RunError, ValueError):
    """Base class: bad data input, named by file/key/value."""


class IndexedDatasetError(DataError):
    """A ``.bin/.idx`` pair is missing, corrupt, truncated or inconsistent."""


class CorpusError(DataError):
    """A named corpus is unknown or could not be fetched."""


class PrepareError(DataError):
    """Raw text / JSONL input could not be turned into a tokenized dataset."""
