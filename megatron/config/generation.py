"""``generate.py`` settings (GPT-NeoX text-generation keys plus our KV-cache keys) and their validation.

The GPT-NeoX spellings and meanings are kept (``text_gen_type``, ``sample_input_file``, ``maximum_tokens``, ...), so
a GPT-NeoX ``text_generation.yml`` loads unchanged. The batch size of ``input-file`` / ``unconditional`` generation
is ``train_micro_batch_size_per_gpu`` (as in GPT-NeoX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, get_args

from megatron.config.components import opt
from megatron.config.errors import ConfigError

TextGenType = Literal["unconditional", "input-file", "interactive"]
KVCacheKind = Literal["auto", "plain", "compressed", "uncapped"]
TEXT_GEN_TYPES: tuple[str, ...] = get_args(TextGenType)
KV_CACHE_KINDS: tuple[str, ...] = get_args(KVCacheKind)


@dataclass
class GenerationConfig:
    text_gen_type: TextGenType = opt("unconditional", "generate.py mode: unconditional (num_samples texts from the "
                                              "end-of-document token) | input-file (one sample per prompt of "
                                              "sample_input_file) | interactive (prompts typed at a console, tokens "
                                              "printed as they come).")
    sample_input_file: Optional[str] = opt(None, "input-file mode: text file of prompts separated by prompt_end.")
    sample_output_file: str = opt("samples.jsonl", "Where generate.py writes its samples, one JSON object per line "
                                                   "(context, text, length, finished, message, duration_seconds).")
    num_samples: int = opt(1, "unconditional mode: number of samples.")
    maximum_tokens: int = opt(64, "Most tokens generated per sample (generation also stops at the end-of-document "
                                  "token).")
    prompt_end: str = opt("\n", "Separator between the prompts of sample_input_file (and the end of an interactive "
                                "prompt).")
    chat_template: Optional[str] = opt(None, "Prompt a fine-tuned chat model: each prompt becomes one user message "
                                             "rendered with this chat template plus the opening of the assistant's "
                                             "reply, tokenized turn by turn as prepare_data.py --sft did: chatml | "
                                             "plain | tokenizer (the tokenizer's own chat_template). None: prompts "
                                             "as written. docs/finetuning.md.")
    temperature: float = opt(0.0, "Sampling temperature. Greedy decoding when temperature, top_k and top_p are all 0; "
                                  "with top_k or top_p set, temperature 0 means 1.")
    top_k: int = opt(0, "Sample from the k most likely tokens (0 = no top-k filter).")
    top_p: float = opt(0.0, "Nucleus sampling: the smallest set of tokens with probability mass >= top_p "
                            "(0 = no top-p filter).")
    recompute: bool = opt(False, "Run the whole sequence through the model at every step (no KV cache): the "
                                 "attention of training, slow; the only way to decode BiPE / FixLLM / "
                                 "self-adjusting-softmax models.")
    kv_cache: KVCacheKind = opt("auto", "KV cache of cached decoding: auto (compressed for SepLLM/StreamingLLM-trained and "
                                "sliding-window models, plain for full attention) | plain (keep every key) | compressed (SepCache eviction: "
                                "initial tokens + at most sep_cache_size separators + local window; flat memory) | "
                                "uncapped (every separator kept: the training rule exactly, memory grows with the "
                                "separator count).")
    init_cache_size: Optional[int] = opt(None, "Initial tokens kept by the SepLLM cache (None = init_tok_max_idx + 1 "
                                               "of the training config).")
    sep_cache_size: int = opt(64, "Most separators the compressed cache keeps per layer (the most recent ones).")
    local_cache_size: Optional[int] = opt(None, "Local window of the SepLLM cache (None = the training config's "
                                                "generate_local_window_size, per layer when set per layer).")
    cache_size: Optional[int] = opt(None, "SepCache budget: with sep_cache_exact_window false, the cache is compressed "
                                          "when it reaches cache_size tokens, so a decode query sees at most "
                                          "cache_size - 1 keys (None = init + sep + 2 x window); must be > "
                                          "init_cache_size + sep_cache_size + window.")
    sep_cache_exact_window: bool = opt(True, "True: trim the cache every step, so each decode query sees exactly the "
                                             "initial tokens, the kept separators and the last window (the trained "
                                             "decode rule; rows independent of their batch). False: SepCache's "
                                             "reference timing (local region grows until the cache reaches cache_size; "
                                             "cheaper).")


def check_generation(gen: GenerationConfig, where: Callable[[str], str]) -> None:
    """Value checks of the generation keys; ``where(key)`` names the source that set a key."""

    def err(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{where(key)}: key '{key}': expected {expected}, got {getattr(gen, key)!r}")

    if gen.text_gen_type not in TEXT_GEN_TYPES:
        raise err("text_gen_type", f"one of {', '.join(TEXT_GEN_TYPES)}")
    if gen.kv_cache not in KV_CACHE_KINDS:
        raise err("kv_cache", f"one of {', '.join(KV_CACHE_KINDS)}")
    for key in ("num_samples", "maximum_tokens"):
        if getattr(gen, key) < 1:
            raise err(key, "an integer >= 1")
    for key in ("top_k", "sep_cache_size"):
        if getattr(gen, key) < 0:
            raise err(key, "an integer >= 0")
    if gen.init_cache_size is not None and gen.init_cache_size < 0:
        raise err("init_cache_size", "an integer >= 0 or null")
    for key in ("local_cache_size", "cache_size"):
        if getattr(gen, key) is not None and getattr(gen, key) < 1:
            raise err(key, "an integer >= 1 or null")
    if gen.temperature < 0:
        raise err("temperature", "a value >= 0")
    if not 0.0 <= gen.top_p <= 1.0:
        raise err("top_p", "a value in [0, 1]")
    if gen.prompt_end == "":
        raise err("prompt_end", "a non-empty string")
