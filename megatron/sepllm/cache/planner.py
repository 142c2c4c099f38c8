"""Step planning for a SepCache-style KV cache: from the ids of the next forward, decide for every layer which stored
slots survive, what the step's queries may attend and at which positions the new tokens sit.

The planner never sees keys or values. It keeps, per layer (:class:`~megatron.sepllm.cache.slots.LayerSlots`), which
token each stored slot holds (``ids``, ``kind``, ``pos``, each ``[B, L]``) and the layer's budget;
:meth:`SepCachePlanner.plan_step` turns the step's ids and padding mask into one :class:`StepPlan` per layer, an
adapter applies it to its key/value tensors (:func:`megatron.sepllm.cache.storage.store_step`) and calls
:meth:`SepCachePlanner.commit`. Planning before the forward is what lets the ids reach the cache at all: transformers'
attention calls ``cache.update(k, v, layer)`` with no ids.

* **Ragged rows with a validity mask.** Rows keep their own slot sets; after a compression each row is packed to the
  right and left-filled with invalid slots. Padding is read from the attention mask (never from a pad id) and is
  invalid from the start, so no pad is ever attended.
* **Initial tokens** are each row's first ``init_cache_size`` *valid* tokens (left padding aware, spec §1.4).
* **Bound (the reference's).** A decode step (one query) compresses before attention when the stored length after
  appending its token reaches ``cache_size`` (or, with ``exact_window``, when a row holds more than ``local_size``
  local tokens), so a decode query attends at most ``cache_size - 1`` keys; ``after_step`` timing (the streaming
  manager, spec §3.2 / §7 item 6) compresses when the cache exceeds ``cache_size``, at the start of the next step.
  A multi-token step is never compressed (reference) unless ``followed_by_decode`` lets it store right away what the
  next decode step would keep, or ``prefill_attention="stream"`` evicts inside it on the token-by-token schedule.
* **Decode semantics.** ``exact_window=False`` (the reference SepCache): between compressions the local region grows
  from ``w`` to the budget, so a query sees the kept initial tokens and separators plus *at least* the last ``w``
  tokens. ``exact_window=True``: the cache is trimmed every step, so a decode query sees exactly initial + kept
  separators + the last ``w`` tokens (the trained decode rule of spec §1.3 / ``rules.decode_keep_mask``, with at
  most ``s`` separators).
* **Layers with equal sizes** hold equal slot sets (same ids, same rule): they share one plan.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron.sepllm.attention import rules
from megatron.sepllm.cache.eviction import (INITIAL, INVALID, LOCAL, SEPARATOR, Compression, EvictionRule,
                                            LayerBudget)
from megatron.sepllm.cache.slots import LayerSlots, StepPlan, cache_positions, cat_slices

#: what a multi-token step attends: causal ``full`` (reference), the ``sepllm`` mask, or the ``stream`` schedule
PREFILL_ATTENTION = ("full", "sepllm", "stream")


class SepCachePlanner:
    """Plans the steps of one prompt batch for ``layers`` under ``rule``.

    ``prefill_attention``: one of :data:`PREFILL_ATTENTION`. ``segment_positions``: a ``stream`` step also records,
    per segment of queries between two compressions, the cache index of every key (positional re-encoding needs it).
    """

    def __init__(self, layers: Sequence[LayerSlots], rule: EvictionRule, prefill_attention: str = "full",
                 segment_positions: bool = False):
        self.layers = list(layers)
        self.rule = rule
        self.prefill_attention = prefill_attention
        self.segment_positions = segment_positions
        self._separator_set = frozenset(int(t) for t in rule.separator_token_ids)
        self._kinds: dict = {}      # canonical layout -> kinds tensor (decode fast path)
        self.valid_seen: Optional[torch.Tensor] = None   # [B] number of real tokens seen per row
        self.tokens_seen = 0                             # number of token slots fed per row (padding included)
        self.seen_sum = 0                                # valid_seen.sum() as an int (set once per step)
        self._fast_positions: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return -1 if self.valid_seen is None else int(self.valid_seen.shape[0])

    # ----- planning -----
    def plan_step(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                  followed_by_decode: bool = False) -> torch.Tensor:
        """Plan the forward of the ids ``[B, q]`` (and their 0/1 padding mask ``[B, q]``) for every layer; returns
        the ``position_ids [B, q]`` to pass to the model (each row counts only its real tokens, like HF generate).

        ``followed_by_decode``: the caller promises that the next step (if any) feeds one token. A multi-token step
        is never compressed (reference), but with this promise it may store right away what the next decode step's
        compression would keep — identical results, less memory in between."""
        if input_ids.dim() != 2:
            raise ValueError(f"set_step_tokens expects input_ids [B, q], got shape {tuple(input_ids.shape)}")
        bsz, q = input_ids.shape
        device = input_ids.device
        new_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(device=device, dtype=torch.bool))
        if new_valid.shape != input_ids.shape:
            raise ValueError(f"attention_mask for the step must be [B, q] = {tuple(input_ids.shape)}, got "
                             f"{tuple(new_valid.shape)} (pass only the new tokens' mask)")
        if self.valid_seen is None:
            self.valid_seen = torch.zeros(bsz, dtype=torch.long, device=device)
        elif self.valid_seen.shape[0] != bsz:
            raise ValueError(f"batch size changed from {self.valid_seen.shape[0]} to {bsz}; start a new SepCache")
        if any(layer.plan is not None for layer in self.layers):
            raise RuntimeError("set_step_tokens called twice without a forward pass in between")
        if q == 1 and bsz == 1 and self._plan_decode_fast(input_ids, new_valid, attention_mask is not None):
            return self._fast_positions
        # Padding may only lead a row: a pad after a real token would break the left-packed layout.
        seen_before = self.valid_seen.unsqueeze(1) > 0
        after_real = torch.cumsum(new_valid.to(torch.long), dim=-1) > 0
        after_real = torch.cat([torch.zeros_like(after_real[:, :1]), after_real[:, :-1]], dim=-1) | seen_before
        if bool((after_real & ~new_valid).any()):
            raise ValueError("attention_mask has a 0 after a real token in some row: SepCache supports left padding "
                             "only (pad the prompt on the left)")
        count = self.valid_seen.unsqueeze(1) + torch.cumsum(new_valid.to(torch.long), dim=-1)   # [B, q]
        positions = torch.where(new_valid, count - 1, torch.ones_like(count))                 # HF convention
        token_index = torch.where(new_valid, count - 1, torch.full_like(count, -1))
        planned: dict = {}   # layers with equal sizes hold equal token sets: plan once, share the plan
        for layer in self.layers:
            key = layer.size_key
            if key in planned:
                first = planned[key]
                layer.plan, layer.budget, layer.layout = first.plan, first.budget, None
                continue
            kind_new_tok = torch.where(new_valid, torch.where(count <= layer.init_cache_size,
                                                              torch.full_like(count, INITIAL),
                                                              torch.full_like(count, LOCAL)),
                                       torch.zeros_like(count)).to(torch.int8)
            if q > 1 and self.prefill_attention == "stream":
                layer.plan = self._plan_stream(layer, input_ids, kind_new_tok, positions, token_index)
            else:
                layer.plan = self._plan_layer(layer, input_ids, kind_new_tok, positions, token_index,
                                              followed_by_decode=followed_by_decode and q > 1)
            layer.budget, layer.layout = layer.plan.budget, None
            planned[key] = layer
        self.valid_seen = count[:, -1].clone()
        self.seen_sum = int(self.valid_seen.sum())
        self.tokens_seen += q
        return positions

    def _plan_decode_fast(self, input_ids: torch.Tensor, new_valid: torch.Tensor, masked: bool) -> bool:
        """Plan a batch-1 one-token step without the general planner, when the outcome is cheap to state: the
        stored kinds are INITIAL* SEPARATOR* LOCAL* (all valid) and the step either only appends, or (exact
        window, accumulated separators) drops the oldest local token — keeping it as a separator if it is one —
        and the oldest separators over the cap. Same kept slots, order and counters as ``EvictionRule.compress``
        (tests compare both paths); returns False (nothing changed) whenever another case applies."""
        rule = self.rule
        if rule.eviction_timing != "in_update" or self.layers[0].ids is None:
            return False
        if masked and not bool(new_valid.all()):
            return False
        seen = int(self.valid_seen[0])
        for layer in self.layers:      # check every layer first: all or none take the fast path
            if layer.layout is None:
                layer.layout = canonical_layout(layer.kind)
            if layer.layout is None:
                return False
        positions = self.valid_seen.view(1, 1).clone()
        new_initial = seen + 1 <= self.layers[0].init_cache_size
        dev = input_ids.device
        planned: dict = {}
        plans = []
        for layer in self.layers:
            key = (layer.size_key, layer.layout)
            if key in planned:
                plans.append((layer, planned[key]))
                continue
            n_init, n_sep, n_local = layer.layout
            length = n_init + n_sep + n_local
            is_initial = seen + 1 <= layer.init_cache_size
            if is_initial != new_initial or (is_initial and n_sep + n_local):
                return False
            new_layout = (n_init + 1, n_sep, n_local) if is_initial else (n_init, n_sep, n_local + 1)
            slices = [(0, length)]
            budget = layer.budget
            if rule.exact_window:
                if new_layout[2] > layer.local_size:
                    if new_layout[2] != layer.local_size + 1 or not rule.accumulate:
                        return False
                    leaving = n_init + n_sep
                    is_sep = int(layer.ids[0, leaving]) in self._separator_set
                    n_cand = n_sep + (1 if is_sep else 0)
                    drop = max(0, n_cand - budget.sep_cache_size) if rule.cap_separators else 0
                    budget = budget.after_compression(n_cand, capped=rule.cap_separators)
                    keep_sep_end = leaving + 1 if is_sep else leaving     # separators are n_init..keep_sep_end
                    slices = [(0, n_init), (n_init + drop, keep_sep_end), (leaving + 1, length)]
                    slices = [(a, b) for a, b in slices if b > a]
                    new_layout = (n_init, n_cand - drop, layer.local_size)
            elif length + 1 >= layer.cache_size:
                return False
            planned[key] = (slices, new_layout, budget)
            plans.append((layer, planned[key]))
        built: dict = {}     # one plan per group of layers holding equal slots
        for layer, group in plans:
            slices, new_layout, budget = group
            plan = built.get(id(group))
            if plan is None:
                ids_new = cat_slices(layer.ids, slices, input_ids)
                kind_new = self._kind_table(new_layout, dev)
                plan = built[id(group)] = StepPlan(
                    ids_app=ids_new, kind_app=kind_new, pre_gather_idx=None, gather_idx=None, kind_new=kind_new,
                    ids_new=ids_new, pos_new=cat_slices(layer.pos, slices, positions), attend_compressed=True,
                    attn_mask=None, step_positions=positions, q_len=1, kept_count=sum(new_layout),
                    keep_slices=slices, budget=budget)
            layer.plan, layer.layout, layer.budget = plan, new_layout, budget
        self.valid_seen = self.valid_seen + 1
        self.seen_sum = seen + 1
        self.tokens_seen += 1
        self._fast_positions = positions
        return True

    def _kind_table(self, layout: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """``[1, L]`` kinds of a canonical layout, built once per layout (never written in place)."""
        kind = self._kinds.get(layout)
        if kind is None or kind.device != device:
            n_init, n_sep, n_local = layout
            kind = torch.tensor([[INITIAL] * n_init + [SEPARATOR] * n_sep + [LOCAL] * n_local], dtype=torch.int8,
                                device=device)
            self._kinds[layout] = kind
        return kind

    def _compress(self, layer: LayerSlots, budget: LayerBudget, ids: torch.Tensor, kind: torch.Tensor,
                  window: Optional[int] = None) -> Compression:
        """The rule's compression of a layer's slots (window: the layer's ``local_size`` unless given)."""
        return self.rule.compress(ids, kind, budget, layer.local_size if window is None else window)

    def _compress_slots(self, layer: LayerSlots, budget: LayerBudget, ids: torch.Tensor, kind: torch.Tensor,
                        pos: torch.Tensor, window: Optional[int] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LayerBudget]:
        """:meth:`_compress` plus the ids and token indices of the kept slots."""
        idx, kind_new, budget = self._compress(layer, budget, ids, kind, window)
        pos_new = torch.where(kind_new != INVALID, pos.gather(1, idx), torch.full_like(idx, -1))
        return idx, kind_new, ids.gather(1, idx), pos_new, budget

    def _needs_compression(self, layer: LayerSlots, budget: LayerBudget, kind: torch.Tensor, extra: int = 0) -> bool:
        return self.rule.needs_compression(kind, budget, layer.local_size, extra)

    def _plan_layer(self, layer: LayerSlots, ids: torch.Tensor, kind_tok: torch.Tensor, positions: torch.Tensor,
                    token_index: torch.Tensor, followed_by_decode: bool = False) -> StepPlan:
        bsz, q = ids.shape
        pre_idx = None
        budget = layer.budget
        if layer.ids is None:
            ids_app, kind_app, pos_app = ids, kind_tok, token_index
        else:
            ids_old, kind_old, pos_old = layer.ids, layer.kind, layer.pos
            if self.rule.eviction_timing == "after_step" and self._needs_compression(layer, budget, kind_old):
                # streaming-manager timing: the previous step's overflow is evicted now, before the new token
                pre_idx, kind_old, ids_old, pos_old, budget = self._compress_slots(layer, budget, ids_old, kind_old,
                                                                                   pos_old)
            ids_app, kind_app = torch.cat([ids_old, ids], dim=-1), torch.cat([kind_old, kind_tok], dim=-1)
            pos_app = torch.cat([pos_old, token_index], dim=-1)
        l_app = ids_app.shape[-1]
        gather_idx = None
        kind_new, ids_new, pos_new = kind_app, ids_app, pos_app
        early = False
        if self.rule.eviction_timing == "in_update":
            if q == 1:
                if self._needs_compression(layer, budget, kind_app):
                    gather_idx, kind_new, ids_new, pos_new, budget = self._compress_slots(layer, budget, ids_app,
                                                                                          kind_app, pos_app)
            elif followed_by_decode and self._needs_compression(layer, budget, kind_app, extra=1):
                # The reference never compresses a multi-token step; the decode step after it compresses
                # ``stored + token``. Keeping the window one short now stores exactly what that compression keeps
                # (same leaving tokens, same separators, same budget growth); the decode step then appends its token
                # without compressing. Same kept sets and logits at every step, less memory from here on.
                gather_idx, kind_new, ids_new, pos_new, budget = self._compress_slots(
                    layer, budget, ids_app, kind_app, pos_app, window=layer.local_size - 1)
                early = True
        attend_compressed = q == 1
        if attend_compressed:
            valid_k = kind_new != INVALID
            attn_mask = None if bool(valid_k.all()) else valid_k[:, None, None, :]
        else:
            valid_k = kind_app != INVALID
            l_old = l_app - q
            if self.prefill_attention == "sepllm":
                global_keys = (kind_app == INITIAL) | (kind_app == SEPARATOR) | self.rule.is_separator(ids_app)
                allowed = rules.allowed_mask(global_keys, layer.prefill_local_size, q_offset=l_old, q_len=q,
                                             key_valid=valid_k)
            elif l_old == 0 and bool(valid_k.all()):
                allowed = None       # a plain causal prompt: SDPA's is_causal path, no [B, q, q] mask
            else:
                causal = rules.causal_band(q, l_app, device=ids.device, q_offset=l_old)
                allowed = causal.unsqueeze(0) & valid_k.unsqueeze(1)
            attn_mask = None if allowed is None else _with_self_for_empty_rows(allowed, l_old).unsqueeze(1)
        return StepPlan(ids_app=ids_app, kind_app=kind_app, pre_gather_idx=pre_idx, gather_idx=gather_idx,
                        kind_new=kind_new, ids_new=ids_new, pos_new=pos_new, attend_compressed=attend_compressed,
                        attn_mask=attn_mask, step_positions=positions, q_len=q, early_compression=early,
                        budget=budget)

    def _plan_stream(self, layer: LayerSlots, ids: torch.Tensor, kind_tok: torch.Tensor, positions: torch.Tensor,
                     token_index: torch.Tensor) -> StepPlan:
        """Multi-token step where query ``i`` sees exactly the keys it would see if the tokens were fed one at a time
        (same compression schedule, same timing): chunked streaming == token-by-token streaming, with one forward.

        The cache state is followed as slot references into the appended storage ``old ++ new``; between two
        compressions the visible set only grows, so rows are filled a segment at a time.
        """
        bsz, q = ids.shape
        dev = ids.device
        budget = layer.budget
        if layer.ids is None:
            ref = torch.zeros(bsz, 0, dtype=torch.long, device=dev)
            kind = torch.zeros(bsz, 0, dtype=torch.int8, device=dev)
            cur_ids = ids[:, :0]
            pos_app, l_old = token_index, 0
        else:
            l_old = layer.ids.shape[-1]
            ref = torch.arange(l_old, device=dev).unsqueeze(0).expand(bsz, -1)
            kind, cur_ids = layer.kind, layer.ids
            pos_app = torch.cat([layer.pos, token_index], dim=-1)
        ids_app = torch.cat([cur_ids, ids], dim=-1) if l_old else ids
        l_app = l_old + q
        allowed = torch.zeros(bsz, q, l_app, dtype=torch.bool, device=dev)
        tri = torch.ones(q, q, dtype=torch.bool, device=dev).tril()
        new_valid = kind_tok != INVALID
        after = self.rule.eviction_timing == "after_step"

        segments: Optional[list] = [] if self.segment_positions else None

        def compress(ref, kind, cur_ids, budget):
            idx, kind_c, budget = self._compress(layer, budget, cur_ids, kind)
            return ref.gather(1, idx), kind_c, cur_ids.gather(1, idx), budget

        def visible_keys(ref: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
            visible = torch.zeros(bsz, l_app, dtype=torch.bool, device=dev)
            return visible.scatter_(1, ref, kind != INVALID)

        def record(start: int, n: int, ref: torch.Tensor, kind: torch.Tensor) -> None:
            # positions are indices among the visible cache state; constant while the state only grows
            key_pos = torch.zeros(bsz, l_app, dtype=torch.long, device=dev)
            key_pos.scatter_(1, ref, cache_positions(kind != INVALID))
            segments.append((start, start + n, key_pos, key_pos[:, l_old + start:l_old + start + n]))

        i = 0
        while i < q:
            if after and self._needs_compression(layer, budget, kind):
                ref, kind, cur_ids, budget = compress(ref, kind, cur_ids, budget)
            if self.rule.exact_window:
                n = 1
            elif after:
                n = max(1, budget.cache_size + 1 - kind.shape[-1])
            else:   # in_update: tokens up to a stored length of cache_size - 1 need no compression
                n = budget.cache_size - 1 - kind.shape[-1]
            n = min(n, q - i)
            if n <= 0:     # in_update: this token's append triggers compression before its own attention
                n = 1
            rows = allowed[:, i:i + n]
            rows |= visible_keys(ref, kind).unsqueeze(1)
            rows[:, :, l_old + i:l_old + i + n] |= tri[:n, :n].unsqueeze(0) & new_valid[:, None, i:i + n]
            ref = torch.cat([ref, torch.arange(l_old + i, l_old + i + n, device=dev).unsqueeze(0).expand(bsz, -1)], -1)
            kind = torch.cat([kind, kind_tok[:, i:i + n]], dim=-1)
            cur_ids = torch.cat([cur_ids, ids[:, i:i + n]], dim=-1)
            if not after and self._needs_compression(layer, budget, kind):
                if n != 1:
                    raise AssertionError("segment overran the compression point")
                ref, kind, cur_ids, budget = compress(ref, kind, cur_ids, budget)
                allowed[:, i] = visible_keys(ref, kind)
            if segments is not None:
                record(i, n, ref, kind)
            i += n
        allowed = _with_self_for_empty_rows(allowed, l_old)
        pos_new = torch.where(kind != INVALID, pos_app.gather(1, ref), torch.full_like(ref, -1))
        return StepPlan(ids_app=ids_app, kind_app=torch.cat([layer.kind, kind_tok], -1) if l_old else kind_tok,
                        pre_gather_idx=None, gather_idx=ref, kind_new=kind, ids_new=cur_ids, pos_new=pos_new,
                        attend_compressed=False, attn_mask=allowed.unsqueeze(1), step_positions=positions, q_len=q,
                        segments=segments, budget=budget)

    # ----- after planning -----
    def commit(self, layer_idx: int) -> None:
        """The adapter stored the layer's keys/values per its plan: take over the new slots, count the retention."""
        layer = self.layers[layer_idx]
        plan = layer.plan
        layer.ids, layer.kind, layer.pos = plan.ids_new, plan.kind_new, plan.pos_new
        if plan.kept_count is None:      # one count per plan (layers with equal sizes share it)
            plan.kept_count = int(((plan.kind_app if plan.early_compression else plan.kind_new) != INVALID).sum())
        layer.last_kept = plan.kept_count
        layer.kept_total += layer.last_kept
        layer.seen_total += self.seen_sum

    def step_attention_mask(self, layer_idx: int) -> Optional[torch.Tensor]:
        """Bool ``[B, 1, q, K]`` mask for the keys the layer attends this step (None = attend all)."""
        plan = self.layers[layer_idx].plan
        if plan is None:
            raise RuntimeError(f"no step planned for layer {layer_idx}")
        return plan.attn_mask

    def finish_step(self) -> None:
        """Drop the per-step plans (after the forward)."""
        for layer in self.layers:
            layer.plan = None

    def retention(self) -> dict:
        """KV retention of spec §3.4, summed over layers and rows.

        ``time_averaged_kept_over_seen``: sum over every update of (real tokens kept after the update) divided by the
        sum of (real tokens seen so far) — the reference SepCache statistic. ``current_kept_over_seen``: the same for
        the latest update only. Padding is never counted (neither kept nor seen).
        """
        kept = sum(layer.kept_total for layer in self.layers)
        seen = sum(layer.seen_total for layer in self.layers)
        last_kept = sum(layer.last_kept for layer in self.layers)
        last_seen = len(self.layers) * (0 if self.valid_seen is None else int(self.valid_seen.sum()))
        return {
            "time_averaged_kept_over_seen": kept / seen if seen else 0.0,
            "current_kept_over_seen": last_kept / last_seen if last_seen else 0.0,
            "kept_tokens_per_layer": [layer.last_kept for layer in self.layers],
            "seen_tokens_per_row": [] if self.valid_seen is None else self.valid_seen.tolist(),
            "compressions_per_layer": [layer.num_compressions for layer in self.layers],
        }

    def layer_contents(self, layer_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, kind, token_index)`` of one layer, each ``[B, L]``: kind 0 invalid, 1 initial, 2 separator,
        3 local; ``token_index`` is the slot's index among its row's real tokens (-1 for invalid slots)."""
        layer = self.layers[layer_idx]
        return layer.ids, layer.kind, layer.pos


def _with_self_for_empty_rows(allowed: torch.Tensor, l_old: int) -> torch.Tensor:
    """``allowed [B, q, K]`` where a query row with no key (a fully padded query) sees itself, at key ``l_old + i``:
    attention needs one key per row, and that row's output is never used."""
    q = allowed.shape[1]
    diag = torch.zeros_like(allowed)
    ar = torch.arange(q, device=allowed.device)
    diag[:, ar, l_old + ar] = True
    return allowed | (diag & ~allowed.any(-1, keepdim=True))


def canonical_layout(kind: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """``(n_initial, n_separator, n_local)`` if batch-1 ``kind [1, L]`` is INITIAL* SEPARATOR* LOCAL*, else None."""
    if kind.shape[0] != 1:
        return None
    values = kind[0].tolist()
    if any(b < a for a, b in zip(values, values[1:])) or (values and values[0] == INVALID):
        return None
    return values.count(INITIAL), values.count(SEPARATOR), values.count(LOCAL)


__all__ = ["PREFILL_ATTENTION", "SepCachePlanner", "canonical_layout"]
