"""The decoding loop: a batch of token prompts (left padded) -> generated tokens, with a KV cache or recomputing.

One cache per prompt batch (reset for the next one). Rows stop at the end-of-document token (``finished``), after
their ``max_new_tokens`` (one limit for the batch or one per row), or when a ``stop`` check says so (``stopped``; e.g.
:class:`megatron.inference.stopping.StopStrings` for lm_eval's stop strings); a model with a learned position table
also stops at its last position (with a ``message``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from megatron.inference.kv_cache import KVCacheError, KVCacheSettings, build_kv_cache
from megatron.inference.sampling import SamplingSettings, next_tokens
from megatron.errors import UserInputError

TokenCallback = Callable[[int, int], None]   # (row, token id) as soon as it is chosen
StopCheck = Callable[[int, list], bool]      # (row, its tokens so far incl. the newest) -> True ends that row


class GenerationError(UserInputError, ValueError):
    """Generation cannot run with these inputs / settings (one line for the user)."""


@dataclass
class GeneratedTokens:
    """What one prompt produced: ``tokens`` excludes the end-of-document token that ``finished`` it."""

    tokens: list = field(default_factory=list)
    finished: bool = False
    stopped: bool = False                              # ended by the ``stop`` check (its last token included)
    message: Optional[str] = None
    step_logits: list = field(default_factory=list)   # per step [V] float32 (only with keep_logits)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(ids [B, L], mask [B, L])``: prompts right-aligned, padding on the left (mask 0)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token (an empty text encodes to nothing; "
                              "unconditional generation starts from the end-of-document token)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def position_limit(model: Any) -> Optional[int]:
    """Number of positions a learned table allows (None: rotary / ALiBi / none have no table limit)."""
    table = model.embed.position_embeddings
    return None if table is None else int(table.num_embeddings)


@torch.no_grad()
def generate_batch(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                   eos_id: Optional[int], sampling: SamplingSettings = SamplingSettings(),
                   vocab_size: Optional[int] = None, recompute: bool = False,
                   cache_settings: KVCacheSettings = KVCacheSettings(), generator: Optional[torch.Generator] = None,
                   on_token: Optional[TokenCallback] = None, keep_logits: bool = False, pad_id: int = 0,
                   cache: Any = None, stop: Optional[StopCheck] = None) -> list[GeneratedTokens]:
    """Generate for every prompt (token ids) of one batch. ``max_new_tokens``: one limit, or one per prompt.
    ``cache``: a cache to reuse (reset here); by default one is built from ``cache_settings``. ``on_token(row, id)``
    streams tokens; ``stop(row, tokens)`` is asked after each token a row keeps and ends the row when True;
    ``keep_logits`` records each step's logits (tests)."""
    limits = _row_limits(max_new_tokens, len(prompts))
    max_new_tokens = max(limits)
    ids, mask = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    bsz, width = ids.shape
    limit = position_limit(model)
    lengths = mask.sum(-1)
    if limit is not None and int(lengths.max()) > limit:
        raise GenerationError(f"a prompt has {int(lengths.max())} tokens but the model's learned position table has "
                              f"{limit} positions (max_position_embeddings)")
    if not recompute:
        try:
            if cache is None:
                cache = build_kv_cache(model, cache_settings, capacity=width + max_new_tokens)
            else:
                cache.reset()
        except KVCacheError as exc:
            raise GenerationError(str(exc)) from None
    results = [GeneratedTokens() for _ in range(bsz)]
    trained_length = int(getattr(getattr(model, "cfg", None), "seq_length", 0) or 0)
    for row, n in enumerate(lengths.tolist()):
        if trained_length and n > trained_length:    # rotary / ALiBi run on, but on positions never trained
            results[row].message = (f"the prompt has {n} tokens, more than seq_length = {trained_length} the model "
                                    f"was trained on: positions past {trained_length} are untrained")
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    padded = bool((mask == 0).any())
    if recompute:
        logits = model(ids, attention_mask=mask if padded else None, logits_to_keep=1)[:, -1]
    else:
        logits = model(ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1)[:, -1]
    for step in range(max_new_tokens):
        tok = next_tokens(logits, sampling, vocab_size, generator)
        for row in range(bsz):
            if done[row]:
                continue
            t = int(tok[row])
            if keep_logits:
                results[row].step_logits.append(logits[row].float().cpu())
            if eos_id is not None and t == eos_id:
                results[row].finished = True
                done[row] = True
                continue
            results[row].tokens.append(t)
            if on_token is not None:
                on_token(row, t)
            if stop is not None and stop(row, results[row].tokens):
                results[row].stopped = True
                done[row] = True
            elif len(results[row].tokens) >= limits[row]:
                done[row] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if limit is not None and int(lengths.max()) + step + 1 >= limit:
            for row in range(bsz):
                if not done[row]:
                    results[row].message = (f"stopped at the model's last position (max_position_embeddings = "
                                            f"{limit})")
            break
        if recompute:
            ids = torch.cat([ids, tok.unsqueeze(1)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(ids, attention_mask=mask if padded else None, logits_to_keep=1)[:, -1]
        else:
            logits = model(tok.unsqueeze(1), kv_cache=cache)[:, -1]   # decode steps: no padding
    return results


def _row_limits(max_new_tokens: int | Sequence[int], rows: int) -> list[int]:
    """One token limit per row (validated: every limit >= 1)."""
    limits = ([int(max_new_tokens)] * rows if isinstance(max_new_tokens, int)
              else [int(n) for n in max_new_tokens])
    if len(limits) != rows:
        raise GenerationError(f"max_new_tokens has {len(limits)} limits for {rows} prompts")
    if not limits or min(limits) < 1:
        raise GenerationError(f"max_new_tokens must be >= 1 for every prompt, got {max_new_tokens}")
    return limits


__all__ = ["GeneratedTokens", "GenerationError", "StopCheck", "TokenCallback", "generate_batch", "left_pad",
           "position_limit"]
