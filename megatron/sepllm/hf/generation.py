"""SepLLM generation with :class:`~megatron.sepllm.hf.cache.SepCache` for Hugging Face decoders (transformers 5.x).

``model.generate(**inputs, custom_generate=megatron.sepllm.generate, init_cache_size=4, sep_cache_size=128,
local_size=256, cache_size=512, USE_MAX_SEP_CACHE=True, separator_token_ids=[...], PADDING_ID=..., ...)``
dispatches here (transformers passes the arguments of this function's signature that ``_sample`` lacks, plus the
prepared logits processors / stopping criteria / generation config). The returned output's cache (``.cache``, also
readable as ``.past_key_values``) is the SepCache.

How the pieces meet, without editing transformers:

* ids reach the cache through :meth:`SepCache.set_step_tokens` before each forward (:func:`sepllm_forward`);
* attention runs through an attention function registered with transformers' ``AttentionInterface`` under the name
  ``"sepllm_sdpa"``; the model is switched to it for the duration of the call (:func:`sepllm_attention`) and it
  reads each layer's mask (and, with ``APPLY_PE_SHIFT``, re-rotates the query) from the cache passed as the per-call
  kwarg ``sepllm_cache``. Layers with different sizes therefore get their own masks;
* position ids are computed by the cache from the real (unpadded) token count of each row, like HF's generate.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from megatron.sepllm.hf.cache import SepCache, _num_layers
from megatron.sepllm.hf.compat import SepGenerateOutput, cache_kwarg, generate_output, pop_cache
from megatron.sepllm.hf.config import sep_cache_arguments
from megatron.sepllm.hf.pos_shift import apply_rotary
from megatron.sepllm.hf.trainingfree import applied_handle

ATTN_NAME = "sepllm_sdpa"


def _sepllm_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA over the keys the SepCache returned, with the cache's per-layer mask (the model's mask is ignored)."""
    cache = kwargs.pop("sepllm_cache", None)
    if cache is None:
        raise RuntimeError(f"attention implementation {ATTN_NAME!r} needs the per-call kwarg sepllm_cache=<SepCache>; "
                           "call the model through megatron.sepllm.hf.generation.sepllm_forward")
    layer_idx = module.layer_idx
    mask = cache.step_attention_mask(layer_idx)
    kwargs.pop("is_causal", None)
    segments = cache.layers[layer_idx].plan.segments
    if segments is not None:
        # streamed multi-token step with positional re-encoding: key positions change at every compression, so
        # each segment of queries between two compressions attends keys rotated for that segment
        outs = []
        plan = cache.layers[layer_idx].plan
        q_plain = cache.unrotate(query, plan.step_positions)          # queries without positional encoding
        cos_tab, sin_tab = cache.rope_table(query, key.shape[-2])     # cos/sin of cache positions 0..K-1, once
        for start, end, key_pos, query_pos in segments:
            k_rot = apply_rotary(key, cos_tab[key_pos], sin_tab[key_pos])
            q_seg = apply_rotary(q_plain[:, :, start:end], cos_tab[query_pos], sin_tab[query_pos])
            out, _ = sdpa_attention_forward(module, q_seg, k_rot, value, mask[:, :, start:end], dropout=dropout,
                                            scaling=scaling, is_causal=False, **kwargs)
            outs.append(out)
        return torch.cat(outs, dim=1), None
    if cache.APPLY_PE_SHIFT:
        query = cache.shift_query(layer_idx, query)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False if mask is not None or query.shape[2] == 1 else None, **kwargs)


def register_sepllm_attention() -> str:
    """Register the SepLLM attention function (idempotent) and return its implementation name."""
    AttentionInterface.register(ATTN_NAME, _sepllm_sdpa_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


@contextlib.contextmanager
def sepllm_attention(model: Any) -> Iterator[Any]:
    """Temporarily route the model's attention through the SepCache-aware SDPA function; restores it on exit."""
    name = register_sepllm_attention()
    previous = model.config._attn_implementation
    if previous == name:
        yield model
        return
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} does not support switching its attention implementation "
                           "(it must use transformers' AttentionInterface); SepCache cannot drive it")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def handle_suspended(model: Any) -> contextlib.AbstractContextManager:
    """While SepCache drives ``model``, an ``apply_sepllm`` handle on it steps aside (the cache builds every mask;
    the handle would refuse the cache's 4-D mask); a no-op without an active handle."""
    handle = applied_handle(model)
    if handle is None or handle.is_suspended:
        return contextlib.nullcontext()
    return handle.suspended()


def sepllm_forward(model: Any, cache: SepCache, input_ids: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, followed_by_decode: bool = False,
                   **model_kwargs: Any) -> Any:
    """One forward step of ``input_ids [B, q]`` (``attention_mask [B, q]``: 0/1 for these tokens only) through
    ``model`` with ``cache``; returns the model output. Fast path for streaming: no generate overhead.
    ``followed_by_decode``: see :meth:`SepCache.set_step_tokens` (set by ``generate`` for the prompt)."""
    positions = cache.set_step_tokens(input_ids, attention_mask, followed_by_decode=followed_by_decode)
    bsz, q = input_ids.shape
    # A ready 4-D mask makes transformers skip its own mask construction; the attention function uses the cache's.
    placeholder = torch.ones(bsz, 1, q, 1, dtype=torch.bool, device=input_ids.device)
    ctx = contextlib.nullcontext() if model.config._attn_implementation == ATTN_NAME else sepllm_attention(model)
    try:
        with handle_suspended(model), ctx:
            name = cache.forward_cache_kwarg or cache_kwarg(model)
            return model(input_ids=input_ids, attention_mask=placeholder, position_ids=positions,
                         use_cache=True, sepllm_cache=cache, **{name: cache}, **model_kwargs)
    finally:
        cache.finish_step()


def build_sep_cache(model: Any, init_cache_size: Union[int, Sequence[int]] = 4,
                    sep_cache_size: Union[int, Sequence[int]] = 128, local_size: Union[int, Sequence[int]] = 256,
                    cache_size: Union[int, Sequence[int]] = 512, **kwargs: Any) -> SepCache:
    """A SepCache sized for ``model`` (layer count, model_type presets, rotary settings)."""
    return SepCache(init_cache_size=init_cache_size, sep_cache_size=sep_cache_size, local_size=local_size,
                    cache_size=cache_size, model=model, **kwargs)


@torch.no_grad()
def generate(model: Any, input_ids: torch.LongTensor, logits_processor: Any = None, stopping_criteria: Any = None,
             generation_config: Any = None, synced_gpus: bool = False, streamer: Any = None,
             init_cache_size: Union[int, Sequence[int], None] = None,
             sep_cache_size: Union[int, Sequence[int], None] = None,
             local_size: Union[int, Sequence[int], None] = None, cache_size: Union[int, Sequence[int], None] = None,
             SEP_ACCUMULATION: bool = True, USE_MAX_SEP_CACHE: Optional[bool] = None,
             separator_token_ids: Optional[Sequence[int]] = None, PADDING_ID: Optional[int] = None,
             APPLY_PE_SHIFT: bool = False, exact_window: Optional[bool] = None,
             prefill_attention: Optional[str] = None, prefill_local_size: Union[int, Sequence[int], None] = None,
             eviction_timing: str = "in_update", SEP_PADDING_IN_BATCH: bool = False,
             PRINT_KV_RATIO_INSIDE: bool = False, print_KV_inside_per_steps: int = 1000,
             APPLY_PES_INSIDE: bool = True, base: Optional[float] = None, pe_dim: Optional[int] = None,
             pe_scaling_factor: Optional[float] = None, max_position_embeddings: Optional[int] = None,
             partial_rotation_size: Optional[int] = None, _rope_unsqueeze_dim: int = 1, _rope_seq_dim: int = 1,
             k_seq_dim: int = 2, v_seq_dim: int = 2, layer_num: Optional[int] = None, model_type: Optional[str] = None,
             past_tok_ids: Any = None, key_cache: Any = None, value_cache: Any = None, _seen_tokens: Any = None,
             _kept_kv_ratio: Any = None, _shifted_position_ids: Any = None, **model_kwargs: Any
             ) -> Union[SepGenerateOutput, torch.LongTensor]:
    """Greedy or sampled decoding with a SepCache (the ``custom_generate`` callable).

    The SepCache arguments (sizes, ``SEP_ACCUMULATION``, ``USE_MAX_SEP_CACHE``, ``separator_token_ids``,
    ``PADDING_ID``, ``APPLY_PE_SHIFT``, ``exact_window``, ``prefill_attention``, ``eviction_timing`` and the reference's
    own options ``SEP_PADDING_IN_BATCH``, ``PRINT_KV_RATIO_INSIDE``, ``print_KV_inside_per_steps``,
    ``APPLY_PES_INSIDE`` with ``base`` / ``pe_dim`` / ``pe_scaling_factor`` / ``max_position_embeddings`` /
    ``partial_rotation_size``, the layout options and the empty reference state arguments) are those of
    :class:`~megatron.sepllm.hf.cache.SepCache`. Unset sizes and separators come from the ``sepllm`` block of an exported
    model's config (what it was trained with; or the block the SepLLM authors' top-level keys describe,
    ``config_block.model_block``), else the hub ``generate``'s defaults 4 / 128 / 256 / 512 and the
    model_type separator preset. ``layer_num`` / ``model_type``, when given, must agree with the model.
    The decode rule follows the same order: a model with a ``sepllm`` block decodes as it was trained and as
    ``generate.py`` decodes it (``exact_window=True``, ``USE_MAX_SEP_CACHE=True``, ``prefill_attention="sepllm"`` with
    its prefill windows), so both give the same greedy tokens; a model without one gets the reference SepCache
    (``False`` / ``False`` / ``"full"``). Explicit arguments win.

    A model under ``apply_sepllm`` works too: its handle is suspended for the call (the SepCache builds the masks)
    and is active again afterwards.

    Honours ``do_sample``/``temperature``/``top_k``/``top_p`` (through the logits processors transformers prepared),
    ``eos_token_id`` and ``max_new_tokens`` (stopping criteria), left-padded batches (``attention_mask``), streamers,
    ``output_scores``/``output_logits`` and ``return_dict_in_generate`` (the output carries the SepCache as both
    ``.cache`` and ``.past_key_values``). A cache argument (``cache=`` on transformers >= 5.24, ``past_key_values=``
    before) that is already a SepCache is used as is; any other cache transformers prepared is ignored. Beam search and assistant models are not
    supported (rows of a SepCache hold different token sets).
    """
    if generation_config is None or logits_processor is None or stopping_criteria is None:
        raise TypeError("megatron.sepllm.generate is a transformers custom_generate callable: call "
                        "model.generate(..., custom_generate=megatron.sepllm.generate)")
    if generation_config.num_beams not in (None, 1):
        raise ValueError(f"SepCache generation supports num_beams=1 only, got {generation_config.num_beams}")
    if synced_gpus:
        raise ValueError("SepCache generation does not support synced_gpus")
    attention_mask = model_kwargs.pop("attention_mask", None)
    cache = pop_cache(model_kwargs)   # ``cache`` from transformers 5.24, ``past_key_values`` before
    for key in ("position_ids", "use_cache", "logits_to_keep", "cache_position"):
        model_kwargs.pop(key, None)
    if model_kwargs:
        raise TypeError(f"SepCache generation got unsupported model kwargs {sorted(model_kwargs)}")
    if not isinstance(cache, SepCache):
        resolved = sep_cache_arguments(
            model, init_cache_size=init_cache_size, sep_cache_size=sep_cache_size, local_size=local_size,
            cache_size=cache_size, separator_token_ids=separator_token_ids, PADDING_ID=PADDING_ID,
            USE_MAX_SEP_CACHE=USE_MAX_SEP_CACHE, exact_window=exact_window, prefill_attention=prefill_attention,
            prefill_local_size=prefill_local_size)
        init_cache_size, sep_cache_size, local_size, cache_size, separator_token_ids, PADDING_ID = (
            resolved[k] for k in ("init_cache_size", "sep_cache_size", "local_size", "cache_size",
                                  "separator_token_ids", "PADDING_ID"))
        if layer_num is not None and int(layer_num) != _num_layers(model):
            raise ValueError(f"layer_num={layer_num} but the model has {_num_layers(model)} layers")
        cache = SepCache(init_cache_size=init_cache_size, sep_cache_size=sep_cache_size, local_size=local_size,
                         cache_size=cache_size, SEP_ACCUMULATION=SEP_ACCUMULATION,
                         USE_MAX_SEP_CACHE=resolved["USE_MAX_SEP_CACHE"], separator_token_ids=separator_token_ids,
                         PADDING_ID=PADDING_ID, APPLY_PE_SHIFT=APPLY_PE_SHIFT,
                         exact_window=resolved["exact_window"], prefill_attention=resolved["prefill_attention"],
                         prefill_local_size=resolved["prefill_local_size"], eviction_timing=eviction_timing,
                         model=model,
                         model_type=model_type, SEP_PADDING_IN_BATCH=SEP_PADDING_IN_BATCH,
                         PRINT_KV_RATIO_INSIDE=PRINT_KV_RATIO_INSIDE,
                         print_KV_inside_per_steps=print_KV_inside_per_steps, APPLY_PES_INSIDE=APPLY_PES_INSIDE,
                         base=base, pe_dim=pe_dim, pe_scaling_factor=pe_scaling_factor,
                         max_position_embeddings=max_position_embeddings,
                         partial_rotation_size=partial_rotation_size, _rope_unsqueeze_dim=_rope_unsqueeze_dim,
                         _rope_seq_dim=_rope_seq_dim, k_seq_dim=k_seq_dim, v_seq_dim=v_seq_dim,
                         past_tok_ids=past_tok_ids, key_cache=key_cache, value_cache=value_cache,
                         _seen_tokens=_seen_tokens, _kept_kv_ratio=_kept_kv_ratio,
                         _shifted_position_ids=_shifted_position_ids)
    else:
        if cache.get_seq_length(0) > 0:
            raise ValueError("the cache passed to generate must be a fresh SepCache: generate feeds the whole input_ids as the "
                             "prompt (continue a used cache with sepllm_forward instead)")
        cache.bind_model(model)

    cfg = generation_config
    pad_token_id = cfg._pad_token_tensor
    if pad_token_id is None and cache.PADDING_ID is not None:
        pad_token_id = torch.tensor(cache.PADDING_ID, device=input_ids.device)
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if has_eos and pad_token_id is None:
        raise ValueError("eos stopping needs a pad_token_id (or PADDING_ID) to fill finished rows")
    scores = () if (cfg.return_dict_in_generate and cfg.output_scores) else None
    raw_logits = () if (cfg.return_dict_in_generate and cfg.output_logits) else None
    bsz = input_ids.shape[0]
    unfinished = torch.ones(bsz, dtype=torch.long, device=input_ids.device)
    prompt_mask = attention_mask if attention_mask is not None else None

    with handle_suspended(model), sepllm_attention(model):
        out = sepllm_forward(model, cache, input_ids, prompt_mask, followed_by_decode=True, logits_to_keep=1)
        while True:
            next_logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
            next_scores = logits_processor(input_ids, next_logits)
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (next_logits,)
            if cfg.do_sample:
                next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_scores, dim=-1)
            if has_eos:
                next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, scores)
            if int(unfinished.max()) == 0:
                break
            out = sepllm_forward(model, cache, next_tokens[:, None], None, logits_to_keep=1)
    if streamer is not None:
        streamer.end()
    if cfg.return_dict_in_generate:
        return generate_output(cache, sequences=input_ids, scores=scores, logits=raw_logits, attentions=None,
                               hidden_states=None)
    return input_ids
