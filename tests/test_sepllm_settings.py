"""The one SepLLM resolver: the training backend, apply_sepllm and the exported block read the same settings."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from megatron.config import load_config
from megatron.config.sepllm import SepLLMConfig
from megatron.config.sepllm_settings import SepLLMSettingsError, settings_of
from megatron.sepllm.config_block import build_block
from megatron.sepllm.attention.backend import SepLLMBackend
from megatron.sepllm.hf.config import TrainingFreeConfigError, resolve_for_model
from tests.sep_helpers import model_cfg


def _loaded(**keys) -> SepLLMConfig:
    base = {"Layer_num": 2, "USE_SEP_ATTN_KERNEL_ACCELERATOR": False, "RECOMPILE_SEP_ATTN_KERNEL": False}
    return load_config({**base, **keys}).sepllm


def test_one_resolution_for_backend_hf_and_block() -> None:
    sep = _loaded(separator_token_ids=[13, 11, 13], init_tok_max_idx=2, EXCLUDE_DIAGONAL=False,
                  USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True, prefill_loc_win_size_list=[8, 16],
                  generate_local_window_size=4)
    settings = settings_of(sep, 2)
    assert settings.mode == "sepllm" and settings.separator_ids == (13, 11) and settings.num_initial == 3
    assert settings.prefill_windows == (9, 17) and settings.generate_windows == (4, 4)  # diagonal on prefill only
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mode = "full"  # type: ignore[misc]
    assert SepLLMBackend(sep, model_cfg(num_layers=2)).settings == settings
    assert resolve_for_model(sep, SimpleNamespace(num_hidden_layers=2, vocab_size=64)) == settings
    block = build_block(sep, 2)
    assert block["mode"] == "sepllm"
    assert block["sep_cache"] == {"init_cache_size": 3, "sep_cache_size": 64, "local_size": [4, 4],
                                  "cache_size": [75, 75]}
    assert sep.prefill_windows == [8, 16]  # resolving never rewrites the config


def test_errors_name_the_key_in_each_callers_class() -> None:
    fix = SepLLMConfig(USE_FIXED_SEP_INTERVALs=True, mode="fixllm", fixed_sep_intervals_list=[4, 0], Layer_num=2,
                       USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    with pytest.raises(SepLLMSettingsError, match=r"fixed_sep_intervals_list \(config\) entries must be >= 1, got 0"):
        settings_of(fix, 2)
    with pytest.raises(TrainingFreeConfigError, match=r"fixed_sep_intervals_list \(config\) entries must be >= 1"):
        resolve_for_model(fix, SimpleNamespace(num_hidden_layers=2, vocab_size=64))
    stream = SepLLMConfig(streamingLLM=True, mode="streamingllm", init_tok_max_idx=-1)
    with pytest.raises(SepLLMSettingsError, match="'init_tok_max_idx' must be >= 0 with streamingLLM=True"):
        settings_of(stream, 2)
    # derived 'mode' left at its default: apply_sepllm refuses it instead of guessing
    unresolved = SepLLMConfig(streamingLLM=True, Layer_num=2, USE_SEP_ATTN_KERNEL_ACCELERATOR=False)
    with pytest.raises(TrainingFreeConfigError, match="'mode' = 'full' but the config's switches select "
                                                      "'streamingllm'"):
        resolve_for_model(unresolved, SimpleNamespace(num_hidden_layers=2, vocab_size=64))
