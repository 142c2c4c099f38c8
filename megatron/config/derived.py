"""Every derived config value is computed here, once, as a pure function (no config objects, no I/O)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence, get_args

from megatron.config.errors import ConfigError

# The choices of the model keys, defined here once as the fields' types: config validation checks them, the model
# builds from them.
PosEmb = Literal["learned", "rotary", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm", "scalenorm"]
Activation = Literal["gelu", "relu", "swiglu", "geglu"]
Precision = Literal["fp32", "fp16", "bf16"]
POS_EMBS: tuple[str, ...] = get_args(PosEmb)
NORMS: tuple[str, ...] = get_args(Norm)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
GATED_ACTIVATIONS = ("swiglu", "geglu")
FULL_ATTENTION_TYPES = ("global", "flash")  # both are dense causal attention; "flash" only named a kernel
TANH_GELU_HF_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def gelu_approximation(activation: str, bias_gelu_fusion: bool) -> str:
    """How ``gelu`` is computed: GPT-NeoX's fused bias+GeLU kernel is the tanh approximation, so a model trained with
    ``bias_gelu_fusion`` computes tanh-GELU (``"tanh"``); otherwise exact erf GELU (``"none"``). Gated GEGLU is always
    exact. Returned in ``torch.nn.functional.gelu``'s ``approximate`` spelling."""
    return "tanh" if activation == "gelu" and bias_gelu_fusion else "none"


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def padded_vocab_size(vocab_size: int, divisible_by: int, model_parallel_size: int) -> int:
    """Round the tokenizer's vocab up to a multiple of ``divisible_by * model_parallel_size`` (50277 -> 50304)."""
    if vocab_size < 1:
        raise ConfigError(f"vocab size must be >= 1, got {vocab_size}")
    if divisible_by < 1 or model_parallel_size < 1:
        raise ConfigError(f"make_vocab_size_divisible_by ({divisible_by}) and model_parallel_size "
                          f"({model_parallel_size}) must be >= 1")
    multiple = divisible_by * model_parallel_size
    return -(-vocab_size // multiple) * multiple


def resolve_batch_triple(global_bs: Optional[int], micro: Optional[int], accum: Optional[int],
                         data_parallel_size: int) -> tuple[int, int, int]:
    """Any two of (global, micro, grad-accum) give the third via global = micro * accum * dp; three must agree.

    One given: micro alone -> accum 1; accum alone -> micro 1; global alone -> accum 1, micro = global / dp.
    None given: micro 1, accum 1 (a tiny single-sequence batch, enough for configs that never train).
    """
    dp = data_parallel_size
    for name, value in zip(BATCH_KEYS, (global_bs, micro, accum)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if global_bs is not None and micro is not None and accum is not None:
        if global_bs != micro * accum * dp:
            raise ConfigError(
                f"inconsistent batch sizes: train_batch_size={global_bs} but train_micro_batch_size_per_gpu={micro} x "
                f"gradient_accumulation_steps={accum} x data-parallel size {dp} = {micro * accum * dp}; give two of "
                f"the three or make them agree")
        return global_bs, micro, accum
    if global_bs is not None:
        if micro is None and accum is None:
            accum = 1
        if micro is None:
            if global_bs % (accum * dp):
                raise ConfigError(f"train_batch_size={global_bs} is not divisible by gradient_accumulation_steps="
                                  f"{accum} x data-parallel size {dp}")
            micro = global_bs // (accum * dp)
        else:
            if global_bs % (micro * dp):
                raise ConfigError(f"train_batch_size={global_bs} is not divisible by train_micro_batch_size_per_gpu="
                                  f"{micro} x data-parallel size {dp}")
            accum = global_bs // (micro * dp)
        return global_bs, micro, accum
    micro = 1 if micro is None else micro
    accum = 1 if accum is None else accum
    return micro * accum * dp, micro, accum


def resolve_given_batch(batch_inputs: Sequence[str], global_bs: Optional[int], micro: Optional[int],
                        accum: Optional[int], data_parallel_size: int) -> tuple[int, int, int]:
    """The triple for ``data_parallel_size`` ranks from the batch keys the user GAVE (``batch_inputs``).

    Values derived for another data-parallel size are dropped and derived again, so a global batch the user gave is
    kept (or refused when it cannot be split over these ranks), never silently scaled; one derived from micro x
    accumulation follows the ranks. Without provenance (a config built in code) micro and accumulation count as given.
    """
    given = set(batch_inputs) or {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
    values = {"train_batch_size": global_bs, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": accum}
    picked = [values[k] if k in given else None for k in BATCH_KEYS]
    return resolve_batch_triple(*picked, data_parallel_size)


def ffn_width(hidden_size: int, activation: str, intermediate_size: Optional[int]) -> int:
    """MLP width after the (optional) gating: ``intermediate_size``, else 4 x hidden (gelu/relu), else Llama's
    ``256 * ceil((8/3 * hidden) / 256)`` for swiglu/geglu. Pure, so config validation can check TP splits."""
    if intermediate_size is not None:
        return int(intermediate_size)
    if activation in GATED_ACTIVATIONS:
        multiple = 256
        return multiple * ((int(2 * 4 * hidden_size / 3) + multiple - 1) // multiple)
    return 4 * hidden_size


def warmup_iters(warmup: float, decay_iters: int) -> int:
    """GPT-NeoX ``warmup`` is a fraction of the decay iterations; halves round up (0.5 -> 1, not Python's 0)."""
    return int(math.floor(warmup * decay_iters + 0.5))


def expand_attention_config(spec: Optional[Sequence[Any]], num_layers: int) -> list[str]:
    """GPT-NeoX ``[[["global"], 12]]`` (patterns repeated to fill counts) -> one attention type per layer.

    A plain list of strings of length ``num_layers`` is accepted as already expanded; None means all "global".
    """
    if spec is None:
        return ["global"] * num_layers
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"attention_config: expected a list like [[[\"global\"], {num_layers}]], got {spec!r}")
    if all(isinstance(item, str) for item in spec):
        out = list(spec)
    else:
        out = []
        for item in spec:
            ok = (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                  and item[0] and all(isinstance(t, str) for t in item[0]) and isinstance(item[1], int)
                  and not isinstance(item[1], bool) and item[1] >= 1)
            if not ok:
                raise ConfigError(f"attention_config: each entry must be [[type, ...], count] with count >= 1, "
                                  f"got {item!r}")
            pattern, count = list(item[0]), item[1]
            out += [pattern[i % len(pattern)] for i in range(count)]
    if len(out) != num_layers:
        raise ConfigError(f"attention_config describes {len(out)} layers but num_layers is {num_layers}")
    return out


def precision_from_blocks(fp16: Optional[dict], bf16: Optional[dict], given: Optional[str]) -> str:
    """fp16/bf16 from the DeepSpeed blocks' ``enabled``; an explicit ``precision`` must agree with them."""
    fp16_on = bool(fp16) and bool(fp16.get("enabled", False))
    bf16_on = bool(bf16) and bool(bf16.get("enabled", False))
    if fp16_on and bf16_on:
        raise ConfigError("fp16.enabled and bf16.enabled are both true; choose one precision")
    from_blocks = "fp16" if fp16_on else "bf16" if bf16_on else None
    if given is not None and from_blocks is not None and given != from_blocks:
        raise ConfigError(f"precision={given!r} contradicts the enabled {from_blocks} block")
    return from_blocks or given or "fp32"
