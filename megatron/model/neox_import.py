"""Compatibility import path: GPT-NeoX library checkpoints are read by :mod:`megatron.model.convert.neox_library`."""

from megatron.model.convert.neox_library import from_neox_state_dict, neox_pipeline_to_sequential  # noqa: F401

__all__ = ["from_neox_state_dict", "neox_pipeline_to_sequential"]
