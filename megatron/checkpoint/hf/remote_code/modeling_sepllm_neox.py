"""SepLLM-NeoX for Hugging Face transformers: ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

Written by SepLLM-NeoX's exporter (``tools/ckpts/convert_neox_to_hf.py --architecture sepllm_neox``) next to the
weights, so a model trained there runs without the framework: this file imports only torch, transformers and its
configuration file. Modules and parameter names are the framework's ``GPTModel`` (prefixed ``model.``; the untied
output layer is ``lm_head``), so the weights are a plain copy.

What one forward computes:

* called without a cache (``use_cache=False``, or no cache passed): exactly ``GPTModel.forward(input_ids,
  position_ids, attention_mask)`` of the framework -- rotary / ALiBi / learned / no positions, BiPE, LayerNorm
  (with or without bias or parameters) / RMSNorm / ScaleNorm, query/key norms, every activation, sequential or
  parallel residual, and the attention it was trained with;
* inside ``generate`` (which passes a cache): what the framework's own cached decoding (``generate.py``) computes.
  The prompt attends with the per-layer prefill windows; one-token steps of a SepLLM / StreamingLLM model use the
  per-layer decode windows and count the initial tokens from each row's first real token (as the framework's KV
  cache does), a sliding-window model's steps see its window; FixLLM, self-adjusting softmax and BiPE models, which
  the framework decodes by recomputing the whole sequence, get exactly that row of the recomputation. The cache keeps every key (the trained rule without a
  separator cap); for a compressed cache use SepCache (``custom_generate=megatron.sepllm.generate``).

The attention rule of a layer with window ``w`` (it counts the query itself) and ``a`` initial tokens: query ``q``
attends key ``k`` when ``k <= q`` and ``k`` is one of the first ``a`` tokens, a separator (FixLLM: a position
divisible by the layer's interval) or ``q - k < w``. Padding keys are never attended (a padding query keeps its own
diagonal so no row is empty). Full attention is the rule with no window; sliding-window attention (Mistral) the rule
with a window and no initial tokens or separators.

With an attention implementation other than ``sdpa`` / ``eager`` (set by ``megatron.sepllm.apply_sepllm`` or by
SepCache generation, which register their own functions with transformers' ``AttentionInterface``), the registered
function decides which keys are attended; ALiBi is then added here from the per-call masks those two pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_sepllm_neox import GATED_ACTIVATIONS, SepLLMNeoXConfig

NATIVE_ATTENTION = (None, "sdpa", "eager")        # computed in this file; anything else: ALL_ATTENTION_FUNCTIONS
FULL_PATTERN_MODES = ("full", "sa", "sa_no_deno")  # plain causal pattern (SA changes the softmax only)
CACHED_RULE_MODES = ("sepllm", "streamingllm")     # decoded through a KV cache by the framework (not BiPE)
SEP_CACHE_KWARG = "sepllm_cache"                   # per-call kwarg of SepCache generation (megatron.sepllm)
MASK_PLAN_KWARG = "sepllm_mask_plan"               # per-call kwarg of megatron.sepllm.apply_sepllm
_HISTORY = "_sepllm_neox_history"                  # attribute of a cache: the tokens it holds (ids, validity)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ------------------------------------------------------------------------------------------- the SepLLM keep rule
def separator_bitmap(ids: Tensor, separator_ids: list) -> Tensor:
    """``[B, L]`` bool: True where the token is a separator."""
    if not separator_ids:
        return torch.zeros_like(ids, dtype=torch.bool)
    return torch.isin(ids, torch.tensor(separator_ids, dtype=ids.dtype, device=ids.device))


def left_pad_counts(valid: Tensor) -> Tensor:
    """``[B]``: padding positions before each row's first real token (a row without one counts as all padding)."""
    first = valid.to(torch.int8).argmax(dim=-1)
    return torch.where(valid.any(dim=-1), first, torch.full_like(first, valid.shape[-1]))


def global_keys(ids: Tensor, valid: Tensor, config: SepLLMNeoXConfig, interval: Optional[int],
                pad_counts: Optional[Tensor]) -> Tensor:
    """``[B, L]`` bool keys every later query may see: the initial tokens (counted from ``pad_counts`` when given)
    and the separators (FixLLM: every ``interval``-th position); padding excluded."""
    batch, length = ids.shape
    pos = torch.arange(length, device=ids.device).unsqueeze(0)
    if interval is not None:
        keep = (pos % interval == 0).expand(batch, length)
    elif config.sepllm_mode == "sepllm":
        keep = separator_bitmap(ids, config.separator_ids)
    else:
        keep = torch.zeros_like(ids, dtype=torch.bool)
    if config.num_initial_tokens > 0:
        start = 0 if pad_counts is None else pad_counts.clamp(max=length - 1).unsqueeze(1)
        keep = keep | ((pos >= start) & (pos < start + config.num_initial_tokens))
    return keep & valid


def keep_mask(keys: Optional[Tensor], valid: Tensor, q_start: int, window: Optional[int]) -> Tensor:
    """``[B, 1, Q, L]`` bool (True = attend) for the queries at positions ``q_start..L-1`` of the sequence.

    ``window`` None: causal attention (``keys`` unused). A padding key is never attended, but a query keeps its own
    diagonal so that a padding query's row is not empty."""
    length = valid.shape[1]
    q = torch.arange(q_start, length, device=valid.device).unsqueeze(1)
    k = torch.arange(length, device=valid.device).unsqueeze(0)
    allowed = (k <= q).unsqueeze(0)
    if window is not None:
        allowed = allowed & (keys.unsqueeze(1) | (q - k < window).unsqueeze(0))
    allowed = allowed & (valid.unsqueeze(1) | (q == k).unsqueeze(0))
    return allowed.unsqueeze(1)


def bipe_positions(ids: Tensor, valid: Tensor, separator_ids: list) -> tuple[Tensor, Tensor]:
    """BiPE ``(intra, inter)`` ids ``[B, L]``: ``inter`` counts the separators before a token, ``intra`` its offset in
    its segment (a separator closes its segment). Padding is never a separator and left padding does not lengthen a
    row's first segment, so a padded row gets the unpadded row's ids."""
    is_sep = separator_bitmap(ids.masked_fill(~valid, -1), separator_ids).to(torch.long)
    inter = torch.cumsum(is_sep, dim=-1) - is_sep
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    last_start = torch.cummax(torch.where(is_sep.bool(), pos + 1, torch.zeros_like(pos)), dim=-1).values
    seg_start = torch.cat([torch.zeros_like(last_start[:, :1]), last_start[:, :-1]], dim=-1)
    intra = pos - seg_start
    pad = left_pad_counts(valid).unsqueeze(1)
    intra = torch.where(inter == 0, intra - pad, intra).clamp(min=0) * valid.to(intra.dtype)
    return intra, inter


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al.): ``2^(-8/n)`` powers for a power of two ``n``; otherwise those of the lower
    power of two followed by every other slope of the next one."""

    def power_of_two(n: int) -> list:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def self_adjusting_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, *, scale: float, no_denominator: bool,
                             numerator_bias: float, denominator_bias: float, bias: Optional[Tensor],
                             dropout: float, training: bool) -> Tensor:
    """Self-adjusting softmax over the kept keys, in fp32: ``p * s`` (``sa_no_deno``) or
    ``p * (s - lo + numerator_bias) / (hi - lo)`` with ``lo = min(0, min s)``, ``hi = max(0, max s) +
    denominator_bias`` over the row's kept scores ``s`` and ``p`` their softmax; nothing renormalised."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.float()
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    if no_denominator:
        adjusted = p * s
    else:
        lo = torch.clamp(s.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True), max=0.0)
        hi = torch.clamp(s.masked_fill(~keep, float("-inf")).amax(dim=-1, keepdim=True), min=0.0) + denominator_bias
        adjusted = p * (s - lo + numerator_bias) / (hi - lo)
    adjusted = adjusted.masked_fill(~keep, 0.0)
    if dropout > 0.0 and training:
        adjusted = F.dropout(adjusted, p=dropout)
    return torch.matmul(adjusted, v.float()).to(q.dtype)


# ------------------------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` computed in fp32 (``shape``: the gain's shape)."""

    def __init__(self, shape: Any, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.float32)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)


class ScaleNorm(nn.Module):
    """``g * x / max(||x||, eps)`` with one learned scalar ``g``."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x.to(torch.float32), dim=-1, keepdim=True).clamp(min=self.eps)
        return (x.to(torch.float32) / norm).to(x.dtype) * self.g


def build_norm(config: SepLLMNeoXConfig) -> nn.Module:
    """The model's norm over ``hidden_size``."""
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon, bias=config.use_bias_in_norms)
    if config.norm == "non_parametric_layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon, elementwise_affine=False)
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_epsilon)
    return ScaleNorm(config.norm_epsilon)


class QKNorm(nn.Module):
    """One norm of the model's kind shared by queries and keys (``use_qk_layernorm``) for a token's
    ``[heads, head_dim]``: LayerNorm normalises over both, RMSNorm / ScaleNorm over ``head_dim``."""

    def __init__(self, config: SepLLMNeoXConfig, heads: int, head_dim: int) -> None:
        super().__init__()
        if config.norm in ("layernorm", "non_parametric_layernorm"):
            affine = config.norm == "layernorm"
            self.norm: nn.Module = nn.LayerNorm((heads, head_dim), eps=config.norm_epsilon,
                                                elementwise_affine=affine, bias=affine and config.use_bias_in_norms)
        elif config.norm == "rmsnorm":
            self.norm = RMSNorm((heads, head_dim), config.norm_epsilon)
        else:
            self.norm = ScaleNorm(config.norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class SepLLMNeoXRotaryEmbedding(nn.Module):
    """Rotary angles of the first ``ndims`` dims of each head (rotate-half layout), computed in fp32 from the
    position ids of every call. ``forward(x, position_ids) -> (cos, sin)`` each ``[B, L, ndims]`` in x's dtype
    (the interface SepCache's positional re-encoding reads)."""

    def __init__(self, ndims: int, base: float) -> None:
        super().__init__()
        self.ndims = ndims
        self.base = base

    @property
    def inv_freq(self) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.ndims, 2, dtype=torch.int64).to(torch.float32) / self.ndims))

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x [B, H, L, D]`` (``cos``/``sin`` ``[B, 1, L, n]``)."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    rotated = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "silu": F.silu, "swish": F.silu, "mish": F.mish, "softsign": F.softsign,
    "geglu": F.gelu, "reglu": F.relu, "swiglu": F.silu, "glu": torch.sigmoid, "bilinear": lambda t: t,
}


class SepLLMNeoXMLP(nn.Module):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))``; gated activations split the first projection into a value half and
    a gate half: ``value * act(gate)``."""

    def __init__(self, config: SepLLMNeoXConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.gelu_approximate = config.gelu_approximate
        self.gated = config.activation in GATED_ACTIVATIONS
        up = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, up, bias=config.use_bias_in_mlp)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias_in_mlp)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dense_h_to_4h(x)
        if self.activation == "gelu" and self.gelu_approximate == "onnx":
            h = h * 0.5 * (torch.erf(h / 1.41421) + 1.0)      # GPT-NeoX's onnx_safe GeLU (sqrt(2) rounded)
        elif self.activation == "gelu":
            h = F.gelu(h, approximate=self.gelu_approximate)
        elif self.gated:
            value, gate = h.chunk(2, dim=-1)
            h = value * _ACTIVATIONS[self.activation](gate)
        else:
            h = _ACTIVATIONS[self.activation](h)
        return self.dense_4h_to_h(h)


@dataclass
class AttentionStep:
    """What every layer of one forward shares: per-layer keep masks ``[B, 1, Q, L]`` (None: plain causal when
    ``Q == L``, every key when ``Q == 1``) and the positions of the queries / all keys (ALiBi)."""

    masks: list
    query_positions: Tensor
    key_positions: Optional[Tensor]


class SepLLMNeoXAttention(nn.Module):
    """Fused QKV grouped per key/value head (``[q_0 .. q_{r-1}, k, v]`` per group), optional query/key norm,
    rotary or ALiBi, the layer's SepLLM keep mask, output projection."""

    def __init__(self, config: SepLLMNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        self.is_causal = True
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=config.use_bias_in_attn_linear)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.use_bias_in_attn_linear)
        self.qk_layernorm = QKNorm(config, self.num_heads, self.head_dim) if config.use_qk_layernorm else None

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s = x.shape[:2]
        group = self.num_key_value_groups
        qkv = self.query_key_value(x).view(b, s, self.num_kv_heads, group + 2, self.head_dim)
        q = qkv[:, :, :, :group].reshape(b, s, self.num_heads, self.head_dim)
        return q.transpose(1, 2), qkv[:, :, :, group].transpose(1, 2), qkv[:, :, :, group + 1].transpose(1, 2)

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], step: AttentionStep,
                cache: Optional[Cache], **kwargs: Any) -> Tensor:
        b, s = x.shape[:2]
        q, k, v = self.split_qkv(x)
        if self.qk_layernorm is not None:
            q, k = self.qk_layernorm(q), self.qk_layernorm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        impl = self.config._attn_implementation
        keep = step.masks[self.layer_idx]
        if impl in NATIVE_ATTENTION:
            out = self.attend(q, k, v, keep, step.query_positions, step.key_positions)
        elif self.config.pos_emb == "alibi" or self.config.sepllm_mode in ("sa", "sa_no_deno"):
            out = self._attend_registered_keys(q, k, v, step, kwargs)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(impl, None)
            if attention is None:
                raise ValueError(f"attention implementation {impl!r} is not registered with transformers' "
                                 f"AttentionInterface")
            out, _ = attention(self, q, k, v, keep, scaling=self.scaling,
                               dropout=self.config.attention_dropout if self.training else 0.0, **kwargs)
            out = out.transpose(1, 2)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], q_pos: Tensor,
               k_pos: Optional[Tensor]) -> Tensor:
        """``[B, H, Q, D]`` attention of ``q`` over ``k``/``v`` ``[B, Hkv, L, D]`` with ``keep`` (see
        :class:`AttentionStep`); ALiBi adds ``-slope * (q_pos - k_pos)``; SA modes use the self-adjusting softmax."""
        config = self.config
        dropout = config.attention_dropout if self.training else 0.0
        q_len, k_len = q.shape[2], k.shape[2]
        bias = None
        if config.pos_emb == "alibi":
            slopes = alibi_slopes(self.num_heads).to(q.device)
            distance = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).to(torch.float32).unsqueeze(1)
            bias = -slopes.view(1, -1, 1, 1) * distance
        if keep is None and (bias is not None or config.sepllm_mode in ("sa", "sa_no_deno")):
            keep = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)[None, None]
        if config.sepllm_mode in ("sa", "sa_no_deno"):
            group = self.num_key_value_groups
            return self_adjusting_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), keep,
                                            scale=self.scaling, no_denominator=config.sepllm_mode == "sa_no_deno",
                                            numerator_bias=config.sa_numerator_bias,
                                            denominator_bias=config.sa_denominator_bias, bias=bias,
                                            dropout=config.attention_dropout, training=self.training)
        gqa = self.num_key_value_groups > 1
        if bias is not None:
            mask = bias.masked_fill(~keep, float("-inf")).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling,
                                                  enable_gqa=gqa)
        if keep is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=q_len > 1,
                                                  scale=self.scaling, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, scale=self.scaling,
                                              enable_gqa=gqa)

    def _attend_registered_keys(self, q: Tensor, k: Tensor, v: Tensor, step: AttentionStep,
                                kwargs: dict) -> Tensor:
        """ALiBi under SepCache generation or ``apply_sepllm``: the keys they choose, the bias added here (the
        attention functions they register know no position bias)."""
        if self.config.sepllm_mode in ("sa", "sa_no_deno"):
            raise ValueError("self-adjusting softmax is computed by this model only: run it with attention "
                             "implementation 'sdpa' (no SepCache, no apply_sepllm); the framework decodes SA models by "
                             "recomputing the sequence, which generate(..., use_cache=True) reproduces")
        sep_cache, plan = kwargs.get(SEP_CACHE_KWARG), kwargs.get(MASK_PLAN_KWARG)
        if sep_cache is not None:
            keep = sep_cache.step_attention_mask(self.layer_idx)
            if q.shape[2] == 1:             # a decode step attends the stored slots: their token indices
                k_pos = sep_cache.layer_contents(self.layer_idx)[2].clamp(min=0)
            elif step.key_positions is not None:    # a prompt into an empty cache attends its own tokens
                k_pos = step.key_positions
            else:
                raise ValueError("ALiBi with SepCache: a multi-token step after the prompt (chunked input) attends "
                                 "stored keys whose positions SepCache does not expose; feed one token per step")
            if keep is None:
                keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
                keep = keep.tril(k.shape[2] - q.shape[2])[None, None]
            return self.attend(q, k, v, keep, step.query_positions, k_pos)
        if plan is not None:
            return self.attend(q, k, v, plan.mask_for(self, q, k), step.query_positions, step.key_positions)
        raise ValueError(f"attention implementation {self.config._attn_implementation!r} on an ALiBi model: only "
                         f"'sdpa', 'eager', SepCache generation and apply_sepllm are supported (a registered attention "
                         f"function adds no ALiBi bias)")


class SepLLMNeoXLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(ln1(x)); out = h + mlp(ln2(h))``, or parallel (``gpt_j_residual``)
    ``out = x + attn(ln1(x)) + mlp(ln2(x))`` with ``ln2 = ln1`` when ``gpt_j_tied``."""

    def __init__(self, config: SepLLMNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.parallel = config.gpt_j_residual
        self.input_layernorm = build_norm(config)
        self.post_attention_layernorm = None if config.gpt_j_tied else build_norm(config)
        self.attention = SepLLMNeoXAttention(config, layer_idx)
        self.mlp = SepLLMNeoXMLP(config)
        self.attn_dropout = nn.Dropout(config.hidden_dropout)
        self.mlp_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], step: AttentionStep,
                cache: Optional[Cache], **kwargs: Any) -> Tensor:
        h1 = self.input_layernorm(x)
        attn = self.attn_dropout(self.attention(h1, rotary, step, cache, **kwargs))
        if self.parallel:
            h2 = h1 if self.post_attention_layernorm is None else self.post_attention_layernorm(x)
            return x + attn + self.mlp_dropout(self.mlp(h2))
        h = x + attn
        return h + self.mlp_dropout(self.mlp(self.post_attention_layernorm(h)))


class SepLLMNeoXEmbedding(nn.Module):
    """Word embeddings plus the learned position table (``pos_emb: learned``, or BiPE's intra-segment table) or the
    fixed sinusoidal one (``[sin, cos]`` halves, base 10000); both read at position + ``position_offset``."""

    def __init__(self, config: SepLLMNeoXConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        table = config.pos_emb == "learned" or config.use_bipe
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size) if table else None
        self.sinusoidal = config.pos_emb == "sinusoidal" and not config.use_bipe
        self.position_offset = config.position_offset
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], positions: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.position_embeddings is not None or self.sinusoidal:
            positions = positions + self.position_offset
        if self.sinusoidal:
            dim = x.shape[-1]
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
            angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
            x = x + torch.cat((angles.sin(), angles.cos()), dim=-1).to(x.dtype)
        elif self.position_embeddings is not None:
            limit = self.position_embeddings.num_embeddings
            if positions.numel() and int(positions.max()) >= limit:
                raise ValueError(f"position id {int(positions.max())} exceeds the learned position table "
                                 f"(max_position_embeddings = {limit})")
            x = x + self.position_embeddings(positions)
        return self.dropout(x)


# ------------------------------------------------------------------------------------------------- the token history
@dataclass
class _History:
    """The tokens a cache holds for this model: ids, validity, the positions rotary / ALiBi used (``[B, L]``) and
    the left padding the initial tokens are counted from (None: counted from position 0)."""

    ids: Tensor
    valid: Tensor
    positions: Tensor
    pad_counts: Optional[Tensor]

    def select(self, rows: Tensor) -> "_History":
        rows = rows.to(self.ids.device)
        pad = None if self.pad_counts is None else self.pad_counts.index_select(0, rows)
        return _History(self.ids.index_select(0, rows), self.valid.index_select(0, rows),
                        self.positions.index_select(0, rows), pad)

    def crop(self, length: int) -> "_History":
        return _History(self.ids[:, :length], self.valid[:, :length], self.positions[:, :length], self.pad_counts)


# -------------------------------------------------------------------------------------------------------- models
class SepLLMNeoXPreTrainedModel(PreTrainedModel):
    """What transformers needs to load, initialise and dispatch attention for the classes below."""

    config_class = SepLLMNeoXConfig
    base_model_prefix = "model"
    _no_split_modules = ["SepLLMNeoXLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ScaleNorm):
            hf_init.ones_(module.g)


class SepLLMNeoXModel(SepLLMNeoXPreTrainedModel):
    """Embedding -> layers -> final norm (the framework's ``GPTModel`` without its output layer)."""

    def __init__(self, config: SepLLMNeoXConfig) -> None:
        super().__init__(config)
        self.embed = SepLLMNeoXEmbedding(config)
        self.layers = nn.ModuleList(SepLLMNeoXLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = build_norm(config)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = None
        if config.pos_emb == "rotary":
            ndims = int(head_dim * config.rotary_pct)
            if ndims % 2:
                raise ValueError(f"SepLLMNeoXConfig.rotary_pct = {config.rotary_pct} gives {ndims} rotary dims of "
                                 f"head_dim {head_dim}: expected an even number")
            self.rotary_emb = SepLLMNeoXRotaryEmbedding(ndims, config.rotary_emb_base)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed.word_embeddings = value

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                cache: Optional[Cache] = None, past_key_values: Optional[Cache] = None,
                use_cache: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        """The final-norm hidden states (and the cache, and with ``output_hidden_states`` the embedding output and
        every layer's output). ``cache`` (``past_key_values`` before transformers 5.24) continues the sequence it
        holds; ``attention_mask`` is 2-D (1 = token, 0 = padding), covering the cached and the new tokens or the new
        tokens only."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        given_cache = cache is not None
        if given_cache:
            use_cache = True                # a cache passed in is continued
        elif use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        sep_cache = kwargs.get(SEP_CACHE_KWARG)
        if sep_cache is not None:
            step, table_positions = self._sep_cache_step(sep_cache, input_ids, position_ids)
        else:
            step, table_positions = self._step(input_ids, inputs_embeds, attention_mask, position_ids, cache,
                                               given_cache)
        x = self.embed(input_ids, inputs_embeds, table_positions)
        rotary = None
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb(x, step.query_positions)
            rotary = (cos.unsqueeze(1), sin.unsqueeze(1))
        hidden = (x,) if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, rotary, step, cache, **kwargs)
            if hidden is not None:
                hidden += (x,)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(x), hidden_states=hidden,
                                       **{_CACHE_FIELD: cache})

    # ----- one forward's positions and masks
    def _step(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], attention_mask: Optional[Tensor],
              position_ids: Optional[Tensor], cache: Optional[Cache],
              given_cache: bool) -> tuple[AttentionStep, Tensor]:
        config = self.config
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        batch, q_len = reference.shape[:2]
        device = reference.device
        if input_ids is None and (config.use_bipe or config.sepllm_mode == "sepllm"):
            raise ValueError("separators (SepLLM attention, BiPE) are read from the token ids: pass input_ids, not "
                             "inputs_embeds")
        new_ids = input_ids if input_ids is not None else torch.full((batch, q_len), -1, device=device)
        past = cache.get_seq_length() if cache is not None else 0
        history = self._history(cache, past, batch) if past else None
        if history is None:
            history = _History(new_ids[:, :0], torch.ones(batch, 0, dtype=torch.bool, device=device),
                               torch.zeros(batch, 0, dtype=torch.long, device=device), None)
        ids = torch.cat([history.ids, new_ids], dim=1)
        valid = self._validity(attention_mask, history.valid, batch, q_len, device)
        if config.use_bipe:                 # computed from the ids; position_ids are not read
            intra, positions = bipe_positions(ids, valid, config.bipe_separator_ids)
            table_positions = intra[:, past:]
        else:
            if position_ids is not None:
                new_positions = position_ids.to(device=device, dtype=torch.long).expand(batch, q_len)
            else:
                new_positions = ((valid.cumsum(dim=-1) - 1).clamp(min=0) * valid)[:, past:]
            positions = torch.cat([history.positions, new_positions], dim=1)
            table_positions = new_positions
        cached_rule = config.sepllm_mode in CACHED_RULE_MODES and not config.use_bipe
        pad_counts = history.pad_counts
        if past == 0:
            adaptive = config.batch_adaptive_init_pos or (given_cache and cached_rule)
            pad_counts = left_pad_counts(valid) if adaptive else None
        if cache is not None:
            setattr(cache, _HISTORY, _History(ids, valid, positions, pad_counts))
        decode = q_len == 1 and past > 0 and cached_rule
        masks = self._masks(ids, valid, past, pad_counts, decode)
        return AttentionStep(masks, positions[:, past:], positions), table_positions

    def _sep_cache_step(self, sep_cache: Any, input_ids: Tensor,
                        position_ids: Optional[Tensor]) -> tuple[AttentionStep, Tensor]:
        """SepCache generation: the cache chooses the keys and gives the positions (the keys' positions are known
        here only for a prompt into an empty cache)."""
        if self.config._attn_implementation in NATIVE_ATTENTION:
            raise ValueError(f"{SEP_CACHE_KWARG} is read by SepCache's attention function: call the model through "
                             f"megatron.sepllm.generate / sepllm_forward, which switch to it")
        if self.config.use_bipe:
            raise ValueError("BiPE positions depend on the whole token sequence, which SepCache does not keep: "
                             "generate without custom_generate (the model's own cache)")
        if position_ids is None:
            raise ValueError("SepCache generation passes position_ids (the cache's token counts); got none")
        positions = position_ids.to(torch.long).expand(input_ids.shape[0], input_ids.shape[1])
        key_positions = positions if sep_cache.get_seq_length() == 0 else None
        return AttentionStep([None] * self.config.num_hidden_layers, positions, key_positions), positions

    def _history(self, cache: Cache, past: int, batch: int) -> _History:
        history = getattr(cache, _HISTORY, None)
        if history is None or history.ids.shape[1] < past or history.ids.shape[0] != batch:
            raise ValueError(f"the cache holds {past} tokens this model did not record (batch {batch}): continue a "
                             f"sequence only with the cache this model returned")
        return history.crop(past) if history.ids.shape[1] > past else history

    @staticmethod
    def _validity(attention_mask: Optional[Tensor], previous: Tensor, batch: int, q_len: int,
                  device: torch.device) -> Tensor:
        total = previous.shape[1] + q_len
        if attention_mask is None:
            return torch.cat([previous, torch.ones(batch, q_len, dtype=torch.bool, device=device)], dim=1)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (q_len,
                                                                                                          total):
            raise ValueError(f"attention_mask must be 2-D [batch, tokens] (1 = token, 0 = padding) over the "
                             f"{total} cached + new tokens or the {q_len} new ones; got shape "
                             f"{tuple(attention_mask.shape)} (this model builds its own attention masks)")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        return mask if mask.shape[1] == total else torch.cat([previous, mask], dim=1)

    def _masks(self, ids: Tensor, valid: Tensor, q_start: int, pad_counts: Optional[Tensor],
               decode: bool) -> list:
        """One keep mask per layer (layers with the same window and interval share it)."""
        config = self.config
        length = ids.shape[1]
        plain = bool(valid.all()) and (q_start == 0 or length - q_start == 1)
        windows = config.generate_windows if decode else config.prefill_windows
        built: dict = {}
        masks = []
        for layer in range(config.num_hidden_layers):
            window, interval = None, None
            if config.sepllm_mode not in FULL_PATTERN_MODES:
                window = windows[layer]
                interval = config.fixed_intervals[layer] if config.sepllm_mode == "fixllm" else None
            if window is not None and window >= length:
                window = None               # the window covers every key: causal
            key = (window, interval)
            if key not in built:
                if window is None and plain:
                    built[key] = None
                else:
                    keys = None if window is None else global_keys(ids, valid, config, interval, pad_counts)
                    built[key] = keep_mask(keys, valid, q_start, window)
            masks.append(built[key])
        return masks


class SepLLMNeoXForCausalLM(SepLLMNeoXPreTrainedModel, GenerationMixin):
    """:class:`SepLLMNeoXModel` plus the output layer (``lm_head``, tied to the word embeddings unless the model
    was trained with ``no_weight_tying``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed.word_embeddings.weight"}

    def __init__(self, config: SepLLMNeoXConfig) -> None:
        super().__init__(config)
        self.model = SepLLMNeoXModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                cache: Optional[Cache] = None, past_key_values: Optional[Cache] = None,
                labels: Optional[Tensor] = None, use_cache: Optional[bool] = None, logits_to_keep: int = 0,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs: Any) -> Any:
        """Logits ``[B, S, vocab]`` (the last ``logits_to_keep`` positions when > 0) and, with ``labels``, the
        next-token cross-entropy. See the module docstring for what is computed with and without a cache."""
        if output_attentions:
            raise ValueError("SepLLMNeoX does not return attention weights (output_attentions=True)")
        outputs = self.model(input_ids, attention_mask, position_ids, inputs_embeds,
                             cache if cache is not None else past_key_values, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, **kwargs)
        hidden, cache, all_hidden = outputs.last_hidden_state, getattr(outputs, _CACHE_FIELD), outputs.hidden_states
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        if return_dict is False:
            return tuple(t for t in (loss, logits, cache, all_hidden) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden, **{_CACHE_FIELD: cache})

    def _reorder_cache(self, cache: Cache, beam_idx: Tensor) -> Cache:
        """Beam search: reorder the cached keys and this model's record of their tokens alike."""
        cache.reorder_cache(beam_idx)
        history = getattr(cache, _HISTORY, None)
        if history is not None:
            setattr(cache, _HISTORY, history.select(beam_idx))
        return cache


__all__ = ["SepLLMNeoXForCausalLM", "SepLLMNeoXModel", "SepLLMNeoXPreTrainedModel"]
