"""Separator-id and padding-id presets for known tokenizer families (spec §2).

The lists are explicit, logged config values (spec §7 item 12): each family names which list it uses. For any other
tokenizer the separators are derived from the tokenizer itself (single-token encodings of the base characters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

@dataclass(frozen=True)
class SeparatorPreset:
    """Separator ids and the padding id used by SepCache for one tokenizer family."""

    family: str
    separator_token_ids: tuple[int, ...]
    padding_id: int
    note: str


_GPT_NEOX = SeparatorPreset(
    family="gpt_neox",
    # base 9 + 11 space-variants (streaming manager / SepCache list for GPT-NeoX-20B / Pythia)
    separator_token_ids=(15, 13, 32, 2, 28, 27, 209, 186, 187,
                         964, 1157, 3736, 2195, 3706, 1163, 2490, 50276, 586, 4928, 50275),
    padding_id=0,
    note="GPT-NeoX-20B/Pythia tokenizer, 20-id SepCache list; PADDING_ID 0 = <|endoftext|>",
)
_LLAMA3 = SeparatorPreset(
    family="llama",
    separator_token_ids=(128000, 13, 11, 30, 0, 26, 25, 198, 220, 662, 1174, 949, 758, 2652, 551, 720, 256, 262),
    padding_id=128009,
    note="Llama-3 tokenizer, 18-id SepCache list (includes BOS 128000); PADDING_ID 128009 = <|eot_id|>",
)
_FALCON = SeparatorPreset(
    family="falcon",
    separator_token_ids=(25, 23, 42, 12, 38, 37, 193, 4610, 204, 258, 1212, 23787, 466),
    padding_id=11,
    note="Falcon-40B tokenizer, 13-id list; PADDING_ID 11",
)

_PRESETS = {"llama": _LLAMA3, "gpt_neox": _GPT_NEOX, "pythia": _GPT_NEOX, "falcon": _FALCON}


def known_model_types() -> list[str]:
    """Model types with a built-in separator preset."""
    return sorted(_PRESETS)


def preset_for_model_type(model_type: str) -> SeparatorPreset:
    """Preset for a HF ``config.model_type`` (llama, gpt_neox/pythia, falcon); ``ValueError`` for anything else."""
    key = str(model_type).lower()
    if key not in _PRESETS:
        raise ValueError(f"no separator preset for model_type={model_type!r}; known: {known_model_types()}. "
                         "Pass separator_token_ids=[...] and PADDING_ID=... explicitly, or a tokenizer.")
    return _PRESETS[key]


def separator_ids_from_tokenizer(tokenizer: Any) -> list[int]:
    """Separator ids of an arbitrary tokenizer: the base characters that encode to exactly one id (spec §2), via the
    project-wide ``megatron.tokenizer.separators.separator_ids`` so every component derives the same list."""
    from megatron.tokenizer.separators import separator_ids

    return [int(i) for i in separator_ids(tokenizer)]


def resolve_separators(separator_token_ids: Optional[Sequence[int]] = None, PADDING_ID: Optional[int] = None,
                       model_type: Optional[str] = None, tokenizer: Any = None) -> tuple[list[int], Optional[int]]:
    """Explicit values win; else a model-type preset; else derive from a tokenizer; else ``ValueError``."""
    sep = None if separator_token_ids is None else [int(s) for s in separator_token_ids]
    pad = None if PADDING_ID is None else int(PADDING_ID)
    if sep is None and model_type is not None and str(model_type).lower() in _PRESETS:
        preset = _PRESETS[str(model_type).lower()]
        sep, pad = list(preset.separator_token_ids), (preset.padding_id if pad is None else pad)
    if sep is None and tokenizer is not None:
        sep = separator_ids_from_tokenizer(tokenizer)
        if pad is None:
            pad = getattr(tokenizer, "pad_token_id", None)
    if sep is None:
        raise ValueError("separator_token_ids is required: pass it explicitly, or a model_type in "
                         f"{known_model_types()}, or a tokenizer to derive it from (got model_type={model_type!r})")
    return sep, pad
