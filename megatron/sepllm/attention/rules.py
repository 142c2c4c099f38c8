"""The SepLLM attention rule as pure functions of token ids (spec §1.3, §1.4, §1.8, §1.10).

Every execution path (dense mask, FlexAttention, compact gather) and every cache (SepCache, streaming manager,
decode masks on Hugging Face models) derives its keep/drop decisions from these functions, so the rule is written
exactly once. Nothing here holds state: callers pass ids, sizes and (optionally) a 2-D validity mask.

Conventions: ``ids`` is ``[B, S]`` (int64), positions are 0-based absolute positions in the sequence as given
(left padding included). "Global" keys are the ones visible from every later query regardless of distance:
initial tokens plus separators (or, for FixLLM, every ``interval``-th position). The local window of size ``w``
holds ``w`` tokens *including the query itself* (``EXCLUDE_DIAGONAL=True`` semantics of the reference).

Documents (``reset_attention_mask``): ``doc_start [B, S]`` (``megatron.data.documents.document_starts``) is the first
position of each token's document. Within a causal row "same document" is exactly ``k >= doc_start[q]``, a per-query
lower bound on the key position, so the rule becomes ``causal AND k >= doc_start[q] AND (global[k] OR in_window)``
and the window stops at the document start by itself. Initial tokens and FixLLM positions count from each document's
start (the first document keeps the left-padding-aware initial tokens). ``doc_start=None`` is the rule without
documents, computed exactly as before.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

NO_SEPARATORS = (-1,)


def separator_bitmap(ids: torch.Tensor, separator_ids: Sequence[int]) -> torch.Tensor:
    """``[B, S]`` bool: True where the token id is a separator. ``[-1]`` (or an empty list) means none."""
    sep = [int(s) for s in separator_ids if int(s) >= 0]
    if not sep:
        return torch.zeros_like(ids, dtype=torch.bool)
    return torch.isin(ids, torch.tensor(sep, dtype=ids.dtype, device=ids.device))


def fixed_interval_bitmap(batch: int, seq_len: int, interval: int, device=None) -> torch.Tensor:
    """``[B, S]`` bool for FixLLM: position ``k`` is kept when ``k % interval == 0`` (spec §1.10, inferred phase)."""
    if interval < 1:
        raise ValueError(f"FixLLM interval must be >= 1, got {interval}")
    pos = torch.arange(seq_len, device=device)
    return (pos % interval == 0).unsqueeze(0).expand(batch, seq_len)


def left_pad_counts(attention_mask_2d: torch.Tensor) -> torch.Tensor:
    """Number of leading padding positions per row, from a ``[B, S]`` 0/1 attention mask (never from token ids)."""
    valid = attention_mask_2d.to(torch.bool)
    # index of the first valid token; rows with no valid token count as fully padded
    first_valid = torch.where(valid.any(dim=-1), valid.to(torch.int8).argmax(dim=-1), valid.new_full((), valid.shape[-1], dtype=torch.long))
    return first_valid.to(torch.long)


def initial_bitmap(batch: int, seq_len: int, num_initial: int, pad_counts: Optional[torch.Tensor] = None,
                   device=None) -> torch.Tensor:
    """``[B, S]`` bool: the ``a = num_initial`` initial tokens of each row.

    Without ``pad_counts`` these are positions ``[0, a)``. With ``pad_counts`` (``BATCH_ADAPTIVE_INIT_POS``) row ``b``
    keeps positions ``pad[b] + i`` for ``i < a``, clamped into ``[0, S-1]`` (spec §1.4).
    """
    if num_initial <= 0:
        return torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    pos = torch.arange(seq_len, device=device).unsqueeze(0)
    if pad_counts is None:
        return (pos < num_initial).expand(batch, seq_len)
    start = pad_counts.to(device=pos.device, dtype=torch.long).clamp(max=seq_len - 1).unsqueeze(1)
    end = (start + num_initial).clamp(max=seq_len)
    return (pos >= start) & (pos < end)


def global_key_bitmap(ids: torch.Tensor, separator_ids: Sequence[int], num_initial: int,
                      pad_counts: Optional[torch.Tensor] = None, fixed_interval: Optional[int] = None,
                      doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, S]`` bool of keys visible from every later query: initial tokens OR separators (OR FixLLM positions).

    ``fixed_interval`` replaces separators by every ``interval``-th position (FixLLM). With ``doc_start`` the
    initial tokens are the first ``a`` of every document (the first document's follow ``pad_counts``) and FixLLM
    positions count from each document's start.
    """
    batch, seq_len = ids.shape
    if doc_start is None:
        if fixed_interval is not None:
            keep = fixed_interval_bitmap(batch, seq_len, fixed_interval, device=ids.device)
        else:
            keep = separator_bitmap(ids, separator_ids)
        return keep | initial_bitmap(batch, seq_len, num_initial, pad_counts, device=ids.device)
    doc_start = doc_start.to(device=ids.device, dtype=torch.long)
    rel = torch.arange(seq_len, device=ids.device).unsqueeze(0) - doc_start      # position inside the document
    if fixed_interval is not None:
        if fixed_interval < 1:
            raise ValueError(f"FixLLM interval must be >= 1, got {fixed_interval}")
        keep = rel % fixed_interval == 0
    else:
        keep = separator_bitmap(ids, separator_ids)
    first_doc = doc_start == 0
    initial = (initial_bitmap(batch, seq_len, num_initial, pad_counts, device=ids.device) & first_doc) \
        | (~first_doc & (rel < num_initial))
    return keep | initial


def window_band(q_len: int, k_len: int, window: int, device=None, q_offset: int = 0) -> torch.Tensor:
    """``[Q, K]`` bool: causal AND ``q - k <= window - 1`` (the window counts the query itself).

    ``q_offset`` is the absolute position of the first query (queries are the last ``Q`` of ``K`` positions
    when ``q_offset = K - Q``).
    """
    if window < 1:
        raise ValueError(f"local window must be >= 1, got {window}")
    q = torch.arange(q_len, device=device).unsqueeze(1) + q_offset
    k = torch.arange(k_len, device=device).unsqueeze(0)
    return (k <= q) & (q - k <= window - 1)


def causal_band(q_len: int, k_len: int, device=None, q_offset: int = 0) -> torch.Tensor:
    """``[Q, K]`` bool lower-triangular (causal) mask with the same offset convention as ``window_band``."""
    q = torch.arange(q_len, device=device).unsqueeze(1) + q_offset
    k = torch.arange(k_len, device=device).unsqueeze(0)
    return k <= q


def allowed_mask(global_keys: torch.Tensor, window: int, q_offset: int = 0, q_len: Optional[int] = None,
                 key_valid: Optional[torch.Tensor] = None, key_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense ``[B, Q, K]`` bool mask, True = the query may attend the key (spec §1.3, the reference rule).

    ``allowed = causal AND (global[b, k] OR in_window(q, k))``, optionally AND ``key_valid[b, k]`` (padding) and
    AND ``k >= key_start[b, q]`` (documents: ``key_start [B, Q]`` the first key position of each query's document).
    This is the one dense reference that every fast path is tested against.
    """
    batch, k_len = global_keys.shape
    q_len = k_len - q_offset if q_len is None else q_len
    causal = causal_band(q_len, k_len, device=global_keys.device, q_offset=q_offset)
    band = window_band(q_len, k_len, window, device=global_keys.device, q_offset=q_offset)
    allowed = causal.unsqueeze(0) & (global_keys.unsqueeze(1) | band.unsqueeze(0))
    if key_start is not None:
        allowed = allowed & same_document(key_start, torch.arange(k_len, device=global_keys.device))
    if key_valid is not None:
        allowed = allowed & key_valid.to(torch.bool).unsqueeze(1)
    return allowed


def same_document(key_start: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``[B, Q, K]`` bool: key position ``k_pos [K]`` lies in the query's document, given the query's document
    start ``key_start [B, Q]`` (within a causal row "same document" is exactly ``k >= doc_start[q]``)."""
    return k_pos.to(key_start.device).view(1, 1, -1) >= key_start.unsqueeze(-1)


def decode_keep_mask(global_keys: torch.Tensor, window: int, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, L]`` bool for a single decode query at position ``L-1`` over the whole history (spec §1.3 decode rule),
    with the padding fix of spec §7 item 1 (``key_valid``)."""
    return allowed_mask(global_keys, window, q_offset=global_keys.shape[1] - 1, key_valid=key_valid)[:, 0, :]


def bipe_position_ids(ids: torch.Tensor, separator_ids: Sequence[int],
                      doc_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BiPE ``(intra, inter)`` position ids, each ``[B, S]`` (spec §1.8).

    ``inter[i]`` counts separators strictly before ``i``; ``intra[i]`` is the offset of ``i`` inside its segment,
    restarting at 0 on the token after each separator (the separator closes its own segment). With ``doc_start``
    (``reset_position_ids``) both restart per document: ``inter`` counts the separators since the document's start
    and a document's first token opens a new segment.
    """
    is_sep = separator_bitmap(ids, separator_ids).to(torch.long)
    inter = torch.cumsum(is_sep, dim=-1) - is_sep
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    # segment start = position after the last separator strictly before i (0 if none)
    sep_next = torch.where(is_sep.bool(), pos + 1, torch.zeros_like(pos))
    last_start = torch.cummax(sep_next, dim=-1).values
    seg_start = torch.cat([torch.zeros_like(last_start[:, :1]), last_start[:, :-1]], dim=-1)
    if doc_start is not None:
        doc_start = doc_start.to(device=ids.device, dtype=torch.long)
        inter = inter - torch.gather(inter, 1, doc_start)
        seg_start = torch.maximum(seg_start, doc_start)
    intra = pos - seg_start
    return intra, inter


def allowed_between(global_keys: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
                    key_valid: Optional[torch.Tensor] = None,
                    key_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, Q, K]`` bool: the rule for arbitrary query positions ``q_pos [Q]`` and key positions ``k_pos [K]``.

    ``global_keys`` and ``key_valid`` are ``[B, K]`` and describe the keys at ``k_pos`` (so a caller can evaluate a
    band or a gathered key set without building ``S x S``). With ``key_valid`` a padding key is never attended,
    except that every query keeps its own diagonal, so a fully padded query row stays finite (no NaN).
    ``key_start [B, Q]`` (documents) is the start of each query's document in the coordinates of ``q_pos``: keys
    before it are never attended (the diagonal always lies inside).
    """
    if window < 1:
        raise ValueError(f"local window must be >= 1, got {window}")
    qp = q_pos.to(global_keys.device).view(-1, 1)
    kp = k_pos.to(global_keys.device).view(1, -1)
    causal = kp <= qp
    band = (qp - kp) <= window - 1
    allowed = causal.unsqueeze(0) & (global_keys.to(torch.bool).unsqueeze(1) | band.unsqueeze(0))
    if key_start is not None:
        allowed = allowed & same_document(key_start.to(global_keys.device), kp.view(-1))
    if key_valid is not None:
        allowed = allowed & (key_valid.to(torch.bool).unsqueeze(1) | (qp == kp).unsqueeze(0))
    return allowed


def padded_allowed_mask(global_keys: torch.Tensor, window: int, key_valid: Optional[torch.Tensor] = None,
                        doc_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense ``[B, S, S]`` training/prefill mask with padding: ``allowed AND (key_valid[k] OR k == q)``, and with
    ``doc_start`` AND ``k >= doc_start[q]`` (documents).

    Same as ``allowed_mask`` when ``key_valid`` is None; padding keys are dropped but each query keeps its diagonal.
    A window covering the sequence with no global keys is the (document-) causal mask of full attention.
    """
    pos = torch.arange(global_keys.shape[1], device=global_keys.device)
    return allowed_between(global_keys, pos, pos, window, key_valid, key_start=doc_start)


def row_kept_counts(global_keys: torch.Tensor, window: int, key_valid: Optional[torch.Tensor] = None,
                    doc_start: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form of the rule's row sums in O(B*S): ``(kept [B,S], causal_total [B,S])`` int64.

    ``kept[b, q]`` = number of valid keys query ``q`` attends (valid global keys before its window + valid keys in
    its window); ``causal_total[b, q]`` = number of valid keys ``k <= q``. Padding keys are excluded from both (the
    diagonal a padding query keeps for numerical safety is not a real attended key). With ``doc_start`` both count
    only keys of the query's own document (``k >= doc_start[q]``): the total is what full attention with document
    masks attends.
    """
    batch, seq_len = global_keys.shape
    valid = (torch.ones_like(global_keys, dtype=torch.bool) if key_valid is None else key_valid.to(torch.bool))
    g = global_keys.to(torch.bool) & valid
    zero = torch.zeros(batch, 1, dtype=torch.long, device=global_keys.device)
    cum_g = torch.cat([zero, torch.cumsum(g.to(torch.long), dim=-1)], dim=-1)       # cum_g[:, i] = #g in [0, i)
    cum_v = torch.cat([zero, torch.cumsum(valid.to(torch.long), dim=-1)], dim=-1)
    q = torch.arange(seq_len, device=global_keys.device)
    if doc_start is None:
        start = (q - window + 1).clamp(min=0)                                        # first key inside the window
        kept = cum_g[:, start] + (cum_v[:, q + 1] - cum_v[:, start])
        return kept, cum_v[:, q + 1]
    ds = doc_start.to(device=global_keys.device, dtype=torch.long)
    start = torch.maximum(q - window + 1, ds)                  # the window stops at the document start
    end = cum_v[:, q + 1]
    kept = (torch.gather(cum_g, 1, start) - torch.gather(cum_g, 1, ds)) + (end - torch.gather(cum_v, 1, start))
    return kept, end - torch.gather(cum_v, 1, ds)
