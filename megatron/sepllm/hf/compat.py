"""One place for the transformers API spellings that changed inside 5.x.

transformers 5.24 renamed the cache argument of model forwards and ``generate`` from ``past_key_values`` to ``cache``
(and the output field with it); 5.23 and earlier only know ``past_key_values``. Everything in this project that hands
a cache to a Hugging Face model, or reads one back, goes through these helpers, so both releases work and our own
calls never trigger transformers' deprecation warnings.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, MutableMapping, Optional

from transformers.generation.utils import GenerateDecoderOnlyOutput

#: every spelling transformers 5.x has used for the decoder cache, newest first
CACHE_NAMES = ("cache", "past_key_values")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


#: the cache field of generate's output in the installed transformers
GENERATE_OUTPUT_CACHE_FIELD = "cache" if "cache" in _field_names(GenerateDecoderOnlyOutput) else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The name under which ``model``'s forward takes its KV cache (``cache`` from 5.24, else ``past_key_values``).

    Read from the forward's signature (transformers' deprecation wrapper keeps the new name visible), so a model
    class that still uses the old spelling on a new release is served too.
    """
    forward = getattr(type(model), "forward", None) or model.forward
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return GENERATE_OUTPUT_CACHE_FIELD
    for name in CACHE_NAMES:
        if name in params:
            return name
    return GENERATE_OUTPUT_CACHE_FIELD


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a call of ``model`` (``model(**ids, **cache_kwargs(model, cache))``)."""
    return {cache_kwarg(model): cache}


def output_cache(output: Any) -> Optional[Any]:
    """The cache a model forward or ``generate`` returned, whatever the field is called (None when absent)."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def pop_cache(kwargs: MutableMapping[str, Any]) -> Optional[Any]:
    """Remove every cache spelling from ``kwargs`` and return the cache given (None when none was)."""
    found = None
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


@dataclasses.dataclass
class SepGenerateOutput(GenerateDecoderOnlyOutput):
    """``generate``'s output with the cache readable under both spellings (``out.cache`` and ``out.past_key_values``)
    on every transformers 5.x, so user code written for either release keeps working."""

    def __getattr__(self, name: str) -> Any:
        if name in CACHE_NAMES and name != GENERATE_OUTPUT_CACHE_FIELD:
            return self.get(GENERATE_OUTPUT_CACHE_FIELD)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def generate_output(cache: Any, **fields: Any) -> SepGenerateOutput:
    """Build generate's output object with ``cache`` stored under the installed release's field name."""
    return SepGenerateOutput(**fields, **{GENERATE_OUTPUT_CACHE_FIELD: cache})
