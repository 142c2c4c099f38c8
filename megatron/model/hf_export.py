"""Compatibility import path: the HF weight maps live in :mod:`megatron.model.convert` (``hf`` and ``tables``)."""

from megatron.model.convert.hf import (  # noqa: F401
    check_gpt_neox_compatible,
    check_llama_compatible,
    from_hf_gpt_neox_state_dict,
    from_hf_llama_state_dict,
    hf_gpt_neox_config,
    hf_llama_config,
    to_hf_gpt_neox_state_dict,
    to_hf_llama_state_dict,
)
from megatron.model.convert.tables import clean_state_dict  # noqa: F401

__all__ = ["check_gpt_neox_compatible", "check_llama_compatible", "clean_state_dict", "from_hf_gpt_neox_state_dict",
           "from_hf_llama_state_dict", "hf_gpt_neox_config", "hf_llama_config", "to_hf_gpt_neox_state_dict",
           "to_hf_llama_state_dict"]
