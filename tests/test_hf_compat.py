"""Both transformers 5.x spellings of the cache argument work, and our own calls raise no deprecation warnings.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (model forwards, ``generate`` kwargs and outputs). The
suite runs on whatever release is installed (5.24 pinned in requirements/constraints.txt; 5.23 was run by hand with
these tests too), so the expectations below are derived from the installed release's own signatures.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

import megatron.sepllm as sepllm
from megatron.sepllm.hf.cache import SepCache
from megatron.sepllm.hf.generation import sepllm_forward
from megatron.sepllm.hf.compat import CACHE_NAMES, SepGenerateOutput, cache_kwarg, output_cache, pop_cache
from test_sepcache import SEPS, prompts, tiny_model

SIZES = dict(init_cache_size=2, sep_cache_size=8, local_size=8, cache_size=24, separator_token_ids=SEPS)


def _installed_spelling(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@pytest.mark.parametrize("model_cls", [LlamaForCausalLM, GPTNeoXForCausalLM])
def test_cache_kwarg_is_the_installed_forward_parameter(model_cls):
    model = tiny_model("llama" if model_cls is LlamaForCausalLM else "gpt_neox")
    assert cache_kwarg(model) == _installed_spelling(model_cls)
    assert cache_kwarg(model) in inspect.signature(type(model).forward).parameters


def test_pop_cache_takes_either_spelling_and_leaves_neither():
    for name in CACHE_NAMES:
        kwargs = {name: "the-cache", "other": 1}
        assert pop_cache(kwargs) == "the-cache" and kwargs == {"other": 1}
    assert pop_cache({"other": 1}) is None


def test_generate_output_exposes_the_cache_under_both_names_and_no_warning_is_raised():
    model = tiny_model("llama")
    ids, mask = prompts(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)      # transformers' deprecate_kwarg warns with FutureWarning
        warnings.simplefilter("error", DeprecationWarning)
        out = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate, do_sample=False,
                             max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True, **SIZES)
        cache = out.cache
        assert isinstance(out, SepGenerateOutput) and isinstance(cache, SepCache)
        assert out.past_key_values is cache and output_cache(out) is cache
        # driving the model step by step through our forward helper: no warning either
        fresh = SepCache(model=model, **SIZES)
        step = sepllm_forward(model, fresh, ids, mask)
        assert step.logits.shape[:2] == ids.shape
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        out.not_a_field


def test_a_user_cache_is_accepted_under_the_old_name_too():
    """Code written for 5.23 (``past_key_values=SepCache(...)``) keeps working on newer releases."""
    model = tiny_model("llama")
    ids, mask = prompts(2)
    cache = SepCache(model=model, **SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # transformers may warn about the user's old spelling
        out = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate, do_sample=False,
                             max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True,
                             past_key_values=cache)
    assert output_cache(out) is cache and cache.get_seq_length(0) > 0
    reference = model.generate(input_ids=ids, attention_mask=mask, custom_generate=sepllm.generate, do_sample=False,
                               max_new_tokens=6, pad_token_id=0, **SIZES)
    assert torch.equal(out.sequences, reference)
