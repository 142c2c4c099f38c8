"""Every derived config value is computed here, once, as a pure function (no config objects, no I/O), and the
choices of every key with a fixed set of values, once, as the ``Literal`` type of its field."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence, get_args

from megatron.config.errors import ConfigError

# The choices of the model keys, defined here once as the fields' types: config validation checks them, the model
# builds from them.
PosEmb = Literal["learned", "rotary", "alibi", "sinusoidal", "none"]
Norm = Literal["layernorm", "rmsnorm", "scalenorm", "non_parametric_layernorm"]
# GPT-NeoX's activations (megatron/model/activations.py): the gated ones split the first projection into a value
# half and a gate half, ``value * act(gate)``; ``bilinear`` gates with the identity, ``glu`` with a sigmoid.
Activation = Literal["gelu", "geglu", "relu", "reglu", "swiglu", "silu", "swish", "mish", "softsign", "glu",
                     "bilinear"]
Precision = Literal["fp32", "fp16", "bf16"]
GeluApproximation = Literal["none", "tanh"]          # torch.nn.functional.gelu's `approximate`
#: the Llemma GPT-NeoX release's spelling of what ``num_kv_heads`` builds
AttentionType = Literal["multihead", "groupedquery", "multiquery"]
POS_EMBS: tuple[str, ...] = get_args(PosEmb)
NORMS: tuple[str, ...] = get_args(Norm)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
PRECISIONS: tuple[str, ...] = get_args(Precision)
ATTENTION_TYPES: tuple[str, ...] = get_args(AttentionType)

# The choices of the training-side keys (optimizer, schedule, data, tokenizer, checkpoint, logging, parallel,
# launcher sections), likewise the fields' types; validation accepts other spellings (case) of the same values.
OptimizerType = Literal["Adam", "AdamW", "Lion", "SGD", "cpu_adam"]
LRDecayStyle = Literal["constant", "linear", "cosine", "exponential", "wsd"]
WSDDecayStyle = Literal["linear", "cosine", "1-sqrt"]
DataImpl = Literal["infer", "mmap"]
PackImpl = Literal["packed", "pack_until_overflow", "unpacked"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]   # torch.compile backends (torchtitan: compile.backend)
TokenizerType = Literal["HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer"]
CheckpointScale = Literal["linear"]
WandbMode = Literal["online", "offline", "disabled"]          # or None: the WANDB_MODE environment variable
DistributedBackend = Literal["auto", "nccl", "gloo"]           # or None: auto
Launcher = Literal["pdsh", "openmpi", "mvapich", "slurm"]
OPTIMIZER_TYPES: tuple[str, ...] = get_args(OptimizerType)
LR_DECAY_STYLES: tuple[str, ...] = get_args(LRDecayStyle)
WSD_DECAY_STYLES: tuple[str, ...] = get_args(WSDDecayStyle)
DATA_IMPLS: tuple[str, ...] = get_args(DataImpl)
PACK_IMPLS: tuple[str, ...] = get_args(PackImpl)
TOKENIZER_TYPES: tuple[str, ...] = get_args(TokenizerType)
CHECKPOINT_SCALES: tuple[str, ...] = get_args(CheckpointScale)
WANDB_MODES: tuple[Optional[str], ...] = (None, *get_args(WandbMode))
DISTRIBUTED_BACKENDS: tuple[Optional[str], ...] = (None, *get_args(DistributedBackend))
LAUNCHERS: tuple[str, ...] = get_args(Launcher)
#: GPT-NeoX's other names of an optimizer type
OPTIMIZER_ALIASES = {"cpu_torch_adam": "cpu_adam"}
#: every accepted ``optimizer.type`` spelling (lower case) -> the type built
OPTIMIZER_SPELLINGS = {**{t.lower(): t for t in OPTIMIZER_TYPES}, **OPTIMIZER_ALIASES}
GATED_ACTIVATIONS = ("geglu", "reglu", "swiglu", "glu", "bilinear")
# GPT-NeoX spells bf16 ``bfloat16`` in its ``precision`` key; both spellings are read, ``bf16`` is stored.
PRECISION_SPELLINGS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "bfloat16": "bf16", "float32": "fp32",
                       "float16": "fp16", "half": "fp16"}
FULL_ATTENTION_TYPES = ("global", "flash")  # both are dense causal attention; "flash" only named a kernel
TANH_GELU_HF_NAMES = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def gelu_approximation(activation: str, bias_gelu_fusion: bool) -> GeluApproximation:
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


def decay_iters(train_iters: int, lr_decay_iters: Optional[int], lr_decay_fraction: Optional[float]) -> int:
    """GPT-NeoX's decay length: lr_decay_iters, else floor(train_iters x lr_decay_fraction), else train_iters; >= 1.

    Validation derives it when ``train_iters`` is given; with ``train_epochs`` the trainer does, once the data
    fixes the run length."""
    if lr_decay_iters is not None:
        return max(1, int(lr_decay_iters))
    if lr_decay_fraction is not None:
        return max(1, math.floor(train_iters * lr_decay_fraction))
    return max(1, int(train_iters))


def mlp_widths(hidden_size: int, activation: str, intermediate_size: Optional[int] = None,
               expansion_factor: Optional[float] = None, multiple_of: int = 1) -> tuple[int, int]:
    """``(up, down)``: output width of the MLP's first projection and input width of its second, as GPT-NeoX's
    ``ParallelMLP`` computes them.

    The base width is ``intermediate_size``, else ``expansion_factor x hidden``, else ``4 x hidden``. A gated
    activation keeps the parameter count of the plain MLP: the first projection gets ``int(base * 2 / 3)`` features
    (value and gate halves) and the second projection half of that. Then ``up`` is rounded up to a multiple of
    ``2 x multiple_of`` and ``down`` to a multiple of ``multiple_of``. Llama-7B: ``intermediate_size=32768``,
    ``multiple_of=256`` -> (22016, 11008). Shapes GPT-NeoX would build but could not run (the halves do not meet the
    second projection) are refused here.
    """
    if intermediate_size is not None and expansion_factor is not None:
        raise ConfigError(f"intermediate_size={intermediate_size} and expansion_factor={expansion_factor} are both "
                          f"set; give one of them (GPT-NeoX accepts only one)")
    if multiple_of < 1:
        raise ConfigError(f"mlp_multiple_of must be >= 1, got {multiple_of}")
    if intermediate_size:
        base = int(intermediate_size)
    elif expansion_factor:
        base = int(expansion_factor * hidden_size)
    else:
        base = 4 * hidden_size
    up, down = base, base
    gated = activation in GATED_ACTIVATIONS
    if gated:
        up = int(base * 2 / 3)
        down = up // 2
    up = 2 * multiple_of * -(-up // (2 * multiple_of))
    down = multiple_of * -(-down // multiple_of)
    if up != (2 * down if gated else down) or down < 1:
        raise ConfigError(
            f"MLP width: intermediate_size={intermediate_size}, expansion_factor={expansion_factor}, "
            f"mlp_multiple_of={multiple_of} and activation={activation!r} give a first projection of {up} features and "
            f"a second of {down} inputs, which GPT-NeoX cannot run ({'gated: the first must be twice the second' if gated else 'they must be equal'}); "
            f"choose an intermediate_size or mlp_multiple_of that rounds evenly")
    return up, down


def ffn_width(hidden_size: int, activation: str, intermediate_size: Optional[int] = None,
              expansion_factor: Optional[float] = None, multiple_of: int = 1) -> int:
    """MLP width after the (optional) gating: the input width of the second projection (``mlp_widths``' ``down``);
    Hugging Face's ``intermediate_size``."""
    return mlp_widths(hidden_size, activation, intermediate_size, expansion_factor, multiple_of)[1]


def intermediate_size_for(width: int, activation: str) -> int:
    """The GPT-NeoX ``intermediate_size`` (with ``mlp_multiple_of`` 1) that builds an MLP of exactly ``width`` after
    gating: ``3 x width`` for gated activations (the 2/3 rule then gives ``2 x width`` value+gate features), else
    ``width``. Used when importing a Hugging Face model whose ``intermediate_size`` is the gated width."""
    return 3 * width if activation in GATED_ACTIVATIONS else width


def expand_attention_config(spec: Optional[Sequence[Any]], num_layers: int) -> list[str]:
    """GPT-NeoX ``attention_config`` -> one attention type per layer, as GPT-NeoX's ``expand_attention_types``:
    ``[[pattern, n], ...]`` appends ``pattern`` n times (``[[["local", "global"], 6]]`` is 12 layers);
    ``[[pattern, "all"]]`` repeats ``pattern`` over all layers (num_layers must divide by its length; as in GPT-NeoX
    the first "all" entry decides the whole list). A plain list of strings is taken as already expanded; None means
    all "global". The result must describe exactly ``num_layers`` layers.
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
                  and item[0] and all(isinstance(t, str) for t in item[0])
                  and (item[1] == "all" or (isinstance(item[1], int) and not isinstance(item[1], bool)
                                            and item[1] >= 1)))
            if not ok:
                raise ConfigError(f"attention_config: each entry must be [[type, ...], count] with count >= 1 or "
                                  f"\"all\", got {item!r}")
            pattern, count = list(item[0]), item[1]
            if count == "all":
                if num_layers % len(pattern):
                    raise ConfigError(f"attention_config: num_layers={num_layers} is not divisible by the length of "
                                      f"the pattern {pattern} repeated over \"all\" layers")
                out = pattern * (num_layers // len(pattern))
                break
            out += pattern * count
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
