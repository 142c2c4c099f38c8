"""One declarative key table per architecture, read in both directions (``GPTModel`` <-> Hugging Face, and the
original GPT-NeoX library's checkpoint names for import).

A :class:`KeyRule` names one ``GPTModel`` tensor, the Hugging Face tensor(s) it becomes and the codec between them:

* ``copy``: the same tensor under another name (our fused QKV is HF GPT-NeoX's per-head ``[q_h, k_h, v_h]`` layout and
  our rotary is rotate-half, so the whole GPT-NeoX table is renames);
* ``vocab``: embedding / head rows, trimmed to the HF vocabulary on export and zero-padded back to
  ``padded_vocab_size`` on import;
* ``qkv``: the grouped fused QKV (``[q_g0 .. q_g(r-1), k_g, v_g]`` per KV group, see ``megatron.model.attention``)
  sliced into Llama's ``q_proj`` / ``k_proj`` / ``v_proj`` and re-interleaved on import;
* ``gate_up``: the gated MLP's ``[value; gate]`` rows split into Llama's ``up_proj`` / ``gate_proj``.

Which rules apply is decided by the keys ``GPTModel(cfg)`` itself has (bias-free configs, tied heads), so a table
never disagrees with the model. Every direction reports missing and unexpected keys by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# buffers that older HF / GPT-NeoX versions saved next to the weights; never weights
IGNORED_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")
_LAYER_PARTS = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
                "post_attention_layernorm.bias", "attention.query_key_value.weight", "attention.query_key_value.bias",
                "attention.dense.weight", "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")


@dataclass(frozen=True)
class KeyRule:
    """``ours`` <-> ``hf`` (several HF tensors when the HF class splits ours) through ``codec``.

    ``{i}`` in a name is the layer index; in ``neox`` (the GPT-NeoX library's Sequential names) ``{i2}`` is
    ``i + 2``, ``{final}`` ``num_layers + 3`` and ``{head}`` ``num_layers + 4`` (its flat module numbering)."""

    ours: str
    hf: tuple[str, ...]
    codec: str = "copy"
    neox: Optional[str] = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ours


def _neox_layer_rules() -> tuple[KeyRule, ...]:
    return tuple(KeyRule(f"layers.{{i}}.{part}", (f"gpt_neox.layers.{{i}}.{part}",), neox=f"sequential.{{i2}}.{part}")
                 for part in _LAYER_PARTS)


GPT_NEOX_TABLE: tuple[KeyRule, ...] = (
    KeyRule("embed.word_embeddings.weight", ("gpt_neox.embed_in.weight",), "vocab",
            neox="sequential.0.word_embeddings.weight"),
    KeyRule("embed.position_embeddings.weight", ("gpt_neox.position_embeddings.weight",),
            neox="sequential.0.position_embeddings.weight"),
    *_neox_layer_rules(),
    KeyRule("final_layernorm.weight", ("gpt_neox.final_layer_norm.weight",), neox="sequential.{final}.norm.weight"),
    KeyRule("final_layernorm.bias", ("gpt_neox.final_layer_norm.bias",), neox="sequential.{final}.norm.bias"),
    KeyRule("output_layer.weight", ("lm_head.weight",), "vocab", neox="sequential.{head}.final_linear.weight"),
)

LLAMA_TABLE: tuple[KeyRule, ...] = (
    KeyRule("embed.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    KeyRule("layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    KeyRule("layers.{i}.post_attention_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    *(KeyRule(f"layers.{{i}}.attention.query_key_value.{p}",
              tuple(f"model.layers.{{i}}.self_attn.{n}_proj.{p}" for n in "qkv"), "qkv") for p in ("weight", "bias")),
    *(KeyRule(f"layers.{{i}}.attention.dense.{p}", (f"model.layers.{{i}}.self_attn.o_proj.{p}",))
      for p in ("weight", "bias")),
    *(KeyRule(f"layers.{{i}}.mlp.dense_h_to_4h.{p}",
              (f"model.layers.{{i}}.mlp.up_proj.{p}", f"model.layers.{{i}}.mlp.gate_proj.{p}"), "gate_up")
      for p in ("weight", "bias")),
    *(KeyRule(f"layers.{{i}}.mlp.dense_4h_to_h.{p}", (f"model.layers.{{i}}.mlp.down_proj.{p}",))
      for p in ("weight", "bias")),
    KeyRule("final_layernorm.weight", ("model.norm.weight",)),
    KeyRule("output_layer.weight", ("lm_head.weight",), "vocab"),
)

TABLES: dict[str, tuple[KeyRule, ...]] = {"neox": GPT_NEOX_TABLE, "llama": LLAMA_TABLE}
TIED_HEAD_HF_KEY = "lm_head.weight"
#: the ``sepllm_neox`` export's modeling file mirrors ``GPTModel``'s modules under ``model.``; no table is needed
SEPLLM_NEOX_PREFIX = "model."


def sepllm_neox_key(ours: str) -> str:
    """Our key -> the ``sepllm_neox`` key: ``model.<ours>``, the output layer ``lm_head.weight`` (HF generation's
    name for the head)."""
    return TIED_HEAD_HF_KEY if ours == "output_layer.weight" else SEPLLM_NEOX_PREFIX + ours


# ------------------------------------------------------------------------------------------------------------ codecs
@dataclass(frozen=True)
class CodecContext:
    """What codecs need besides the tensor: the model config and the HF vocabulary size (rows kept on export)."""

    cfg: ModelConfig
    vocab: int


def _groups(ctx: CodecContext) -> tuple[int, int, int, int]:
    from megatron.model.attention import head_dim, kv_heads

    hq, hkv = ctx.cfg.num_attention_heads, kv_heads(ctx.cfg)
    return hq, hkv, head_dim(ctx.cfg), hq // hkv


def _qkv_split(t: Tensor, ctx: CodecContext) -> tuple[Tensor, ...]:
    hq, hkv, d, r = _groups(ctx)
    tail = t.shape[1:]
    grouped = t.reshape(hkv, r + 2, d, *tail)
    return (grouped[:, :r].reshape(hq * d, *tail).contiguous(), grouped[:, r].reshape(hkv * d, *tail).contiguous(),
            grouped[:, r + 1].reshape(hkv * d, *tail).contiguous())


def _qkv_join(parts: Sequence[Tensor], ctx: CodecContext) -> Tensor:
    hq, hkv, d, r = _groups(ctx)
    q, k, v = parts
    tail = q.shape[1:]
    grouped = torch.cat([q.reshape(hkv, r, d, *tail), k.reshape(hkv, 1, d, *tail), v.reshape(hkv, 1, d, *tail)], 1)
    return grouped.reshape(hkv * (r + 2) * d, *tail)


def _gate_up_split(t: Tensor, ctx: CodecContext) -> tuple[Tensor, ...]:
    value, gate = t.chunk(2, dim=0)
    return value.contiguous(), gate.contiguous()


def pad_rows(t: Tensor, cfg: ModelConfig) -> Tensor:
    """Zero-pad embedding rows up to ``padded_vocab_size`` (an HF vocabulary may be the unpadded tokenizer size)."""
    rows = cfg.padded_vocab_size
    if rows is None or t.shape[0] > rows:
        raise ValueError(f"HF vocabulary of {t.shape[0]} rows does not fit padded_vocab_size = {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


_CODECS: dict[str, tuple[Callable[[Tensor, CodecContext], tuple[Tensor, ...]],
                         Callable[[Sequence[Tensor], CodecContext], Tensor]]] = {
    "copy": (lambda t, ctx: (t,), lambda parts, ctx: parts[0]),
    "vocab": (lambda t, ctx: (t[:ctx.vocab],), lambda parts, ctx: pad_rows(parts[0], ctx.cfg)),
    "qkv": (_qkv_split, _qkv_join),
    "gate_up": (_gate_up_split, lambda parts, ctx: torch.cat(list(parts), dim=0)),
}


# ------------------------------------------------------------------------------------------------------------ engine
def plain(t: Any) -> Tensor:
    """A regular tensor from a (possibly distributed) state-dict entry."""
    full = getattr(t, "full_tensor", None)
    return (full() if callable(full) else t).detach()


def clean_state_dict(model_state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Drop wrapper prefixes (DDP/DeepSpeed ``module.``, ``torch.compile``'s ``_orig_mod.``) from a GPTModel state."""
    out: dict[str, Tensor] = {}
    for key, value in model_state.items():
        k, changed = key, True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = plain(value)
    return out


class Reader:
    """Pops keys from a state dict so that leftovers (unexpected keys) can be reported."""

    def __init__(self, state: Mapping[str, Tensor], what: str) -> None:
        self.state, self.what = dict(state), what

    def pop(self, key: str, why: str = "") -> Tensor:
        if key not in self.state:
            raise KeyError(f"{self.what}: missing key {key!r}{why}")
        return self.state.pop(key)

    def pop_optional(self, key: str) -> Optional[Tensor]:
        return self.state.pop(key, None)

    def finish(self) -> None:
        if self.state:
            raise KeyError(f"{self.what}: unexpected keys {sorted(self.state)[:8]}")


def expand(rule: KeyRule, num_layers: int) -> Iterator[tuple[str, tuple[str, ...], Optional[str], Optional[int]]]:
    """``(ours, hf keys, neox key, layer)`` for every layer a rule covers (once for a non-layer rule)."""
    names = {"final": num_layers + 3, "head": num_layers + 4}
    for i in (range(num_layers) if rule.per_layer else [None]):
        fill = dict(names, i=i, i2=None if i is None else i + 2)
        yield (rule.ours.format(**fill), tuple(h.format(**fill) for h in rule.hf),
               None if rule.neox is None else rule.neox.format(**fill), i)


def model_keys(cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig] = None) -> list[str]:
    """The state-dict keys of ``GPTModel(cfg, sepllm_cfg)`` (built on the meta device: no memory, no init)."""
    from megatron.model.gpt import GPTModel

    with torch.device("meta"):
        return list(GPTModel(cfg, sepllm_cfg).state_dict().keys())


def to_hf_state(table: Sequence[KeyRule], model_state: Mapping[str, Any], cfg: ModelConfig,
                vocab: int) -> dict[str, Tensor]:
    """``GPTModel`` state -> HF state through ``table`` (the tied head is not written: HF ties it on load)."""
    src = Reader(clean_state_dict(model_state), "GPTModel state dict")
    ctx = CodecContext(cfg, vocab)
    out: dict[str, Tensor] = {}
    for rule in table:
        split = _CODECS[rule.codec][0]
        for ours, hf, _, _ in expand(rule, cfg.num_layers):
            value = src.pop_optional(ours)
            if value is not None:
                out.update(zip(hf, split(value, ctx)))
    src.finish()
    return out


def from_hf_state(table: Sequence[KeyRule], hf_state: Mapping[str, Any], cfg: ModelConfig, expected: Sequence[str],
                  what: str, column: str = "hf") -> dict[str, Tensor]:
    """HF (``column="hf"``) or GPT-NeoX library (``column="neox"``) state -> the ``GPTModel`` keys ``expected``.

    A tied model's head in the source (HF writes ``lm_head.weight`` again in some versions) is dropped."""
    src = Reader({k: plain(v) for k, v in hf_state.items() if not IGNORED_BUFFERS.search(k)}, what)
    ctx = CodecContext(cfg, cfg.padded_vocab_size or 0)
    wanted = set(expected)
    out: dict[str, Tensor] = {}
    for rule in table:
        join = _CODECS[rule.codec][1]
        for ours, hf, neox, layer in expand(rule, cfg.num_layers):
            names = hf if column == "hf" else ((neox,) if neox is not None else ())
            if ours not in wanted:
                for name in names:
                    src.pop_optional(name)  # e.g. the tied head, or GPT-NeoX's unused norm of a gpt_j_tied layer
                continue
            if not names:
                raise KeyError(f"{what}: no source name for {ours!r}")
            why = f" (layer {layer})" if layer is not None else ""
            out[ours] = join([src.pop(n, why) for n in names], ctx)
    src.finish()
    missing = sorted(wanted - set(out))
    if missing:
        raise KeyError(f"{what}: the table gives no value for model keys {missing[:8]}")
    return out
