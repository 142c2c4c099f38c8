"""Loading, merging, overrides, derived values, SepLLM modes, round trip and the DeepSpeed view of configs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from megatron.config import ConfigError, NeoXConfig, load_config, padded_vocab_size
from megatron.config.derived import expand_attention_config, resolve_batch_triple
from megatron.config._loading.yaml_io import parse_yaml_text

TINY = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 128}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- YAML flavour
def test_neox_yaml_flavour() -> None:
    text = """{
      # comment
      'lr': 1e-3, "eps": 1.0e-8, big: 1e5, t: True, f: False, n: None, i: 7, neg: -1, s: '1e-3',
      base: &A [1, 2], copy: *A,
    }"""
    data = parse_yaml_text(text, "x.yml")
    assert data == {"lr": 0.001, "eps": 1e-8, "big": 100000.0, "t": True, "f": False, "n": None, "i": 7, "neg": -1,
                    "s": "1e-3", "base": [1, 2], "copy": [1, 2]}
    assert isinstance(data["i"], int) and isinstance(data["lr"], float)


def test_unsafe_yaml_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "evil.yml", "a: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match=r"evil.yml:1:4: YAML error \(only plain data is allowed\).*python/object"):
        load_config(path)


def test_numeric_strings_are_coerced(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yml", yaml.safe_dump({
        **TINY, "optimizer": {"type": "adamw", "params": {"lr": "1e-3", "eps": "1e-8", "betas": ["0.9", 0.95]}},
        "min_lr": "1e-5", "train-iters": "1e3", "weight-decay": "0.1"}))
    cfg = load_config(path)
    assert cfg.optimizer.type == "AdamW"
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.eps == 1e-8 and cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.lr_schedule.min_lr == 1e-5 and cfg.optimizer.weight_decay == 0.1
    assert cfg.training.train_iters == 1000 and isinstance(cfg.training.train_iters, int)
    assert cfg.optimizer.params == {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}


def test_spellings_are_interchangeable() -> None:
    cfg = load_config({**TINY, "use-bipe": True, "bipe_seps": [5], "pos-emb": "rotary", "Separator-Token-IDs": [5],
                       "use_sep_attn_kernel_accelerator": False, "Train_Iters": 3})
    assert cfg.sepllm.USE_BiPE and cfg.sepllm.BiPE_seps == [5] and cfg.sepllm.separator_token_ids == [5]
    assert cfg.training.train_iters == 3


# ----------------------------------------------------------------------------------------------- merging
def test_merge_left_to_right_with_deep_merge(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yml", """{
      "num-layers": 4, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 128,
      "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 12},
      "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.95], "torch_adam": true}},
      "zero_optimization": {"stage": 1, "overlap_comm": true},
    }""")
    b = _write(tmp_path / "b.yml", """
      model: {num_layers: 6}
      fp16: {initial_scale_power: 8}
      optimizer: {params: {lr: 3.0e-4}}
      zero_optimization: {stage: 2}
    """)
    cfg = load_config(a, b)
    assert cfg.model.num_layers == 6
    assert cfg.training.fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    assert cfg.training.precision == "fp16" and cfg.model.precision == "fp16"
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.optimizer.params["torch_adam"] is True
    assert cfg.training.zero_optimization == {"stage": 2, "overlap_comm": True} and cfg.training.zero_stage == 2
    assert cfg.sources == [str(a), str(b)]

    reverse = load_config(b, a)
    assert reverse.model.num_layers == 4 and reverse.optimizer.lr == 6e-4
    assert reverse.training.fp16["initial_scale_power"] == 12


def test_overrides_apply_last_in_order(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yml", yaml.safe_dump({**TINY, "separator_token_ids": [1, 2],
                                                   "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}}))
    cfg = load_config(a, overrides=["--num-layers", "3", "--optimizer.params.lr", "1e-3", "--lr=2e-3",
                                    "--sep_attention_impl", "compact", "--init_tok_max_idx", "-1",
                                    "--separator_token_ids", "[7, 8]", "--PRINT_KV_RATIO", "--fp16.enabled=true",
                                    "--model.hidden_size", "32"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 32
    assert cfg.optimizer.lr == 2e-3
    assert cfg.sepllm.sep_attention_impl == "compact" and cfg.sepllm.init_tok_max_idx == -1
    assert cfg.sepllm.separator_token_ids == [7, 8] and cfg.sepllm.PRINT_KV_RATIO is True
    assert cfg.training.precision == "fp16"
    assert cfg.overrides[0] == "--num-layers=3"
    # a mapping of overrides works the same way
    assert load_config(a, overrides={"optimizer.params.lr": 5e-4}).optimizer.lr == 5e-4


# ----------------------------------------------------------------------------------------------- derived values
@pytest.mark.parametrize("given, dp, expected", [
    ((None, 4, 2), 2, (16, 4, 2)),
    ((16, 4, None), 2, (16, 4, 2)),
    ((16, None, 2), 2, (16, 4, 2)),
    ((16, 4, 2), 2, (16, 4, 2)),
    ((16, None, None), 2, (16, 8, 1)),
    ((None, 4, None), 3, (12, 4, 1)),
    ((None, None, 5), 1, (5, 1, 5)),
    ((None, None, None), 1, (1, 1, 1)),
])
def test_batch_triple(given, dp, expected) -> None:
    assert resolve_batch_triple(*given, data_parallel_size=dp) == expected


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(50277, 128, 1) == 50304
    assert padded_vocab_size(50277, 128, 2) == 50432
    assert padded_vocab_size(50304, 128, 1) == 50304
    with pytest.raises(ConfigError):
        padded_vocab_size(0, 128, 1)


def test_attention_config_expansion() -> None:
    # GPT-NeoX's expand_attention_types: a pattern is appended `count` times; "all" repeats it over every layer
    assert expand_attention_config([[["global", "flash"], 3], [["global"], 1]], 7) == ["global", "flash"] * 3 + [
        "global"]
    assert expand_attention_config([[["global", "flash"], "all"]], 4) == ["global", "flash"] * 2
    with pytest.raises(ConfigError, match="not divisible by the length"):
        expand_attention_config([[["global", "flash"], "all"]], 3)
    with pytest.raises(ConfigError, match="describes 4 layers"):
        expand_attention_config([[["global", "flash"], 2]], 2)
    assert expand_attention_config(None, 2) == ["global", "global"]
    assert expand_attention_config(["flash", "global"], 2) == ["flash", "global"]


def test_derived_values_in_one_config() -> None:
    cfg = load_config({**TINY, "train-iters": 1000, "warmup": 0.013, "world_size": 4,
                       "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
                       "attention-config": [[["global"], 2]], "bf16": {"enabled": True}, "save": "/tmp/ck"})
    assert cfg.lr_schedule.lr_decay_iters == 1000 and cfg.lr_schedule.warmup_iters == 13
    assert cfg.parallel.data_parallel_size == 4 and cfg.training.train_batch_size == 24
    assert cfg.model.attention_config == ["global", "global"]
    assert cfg.model.max_position_embeddings == 128
    assert cfg.training.precision == "bf16" and cfg.model.precision == "bf16"
    assert cfg.logging.log_dir == "/tmp/ck/logs"
    assert cfg.sepllm.mode == "full" and cfg.sepllm.prefill_windows == [128, 128]
    explicit = load_config({**TINY, "train-iters": 1000, "warmup-iters": 7, "lr-decay-iters": 500})
    assert explicit.lr_schedule.warmup_iters == 7 and explicit.lr_schedule.lr_decay_iters == 500
    assert load_config({**TINY, "precision": "bf16"}).training.bf16 == {"enabled": True}


# ----------------------------------------------------------------------------------------------- SepLLM modes
SEP = {**TINY, "pos-emb": "rotary", "separator_token_ids": [15, 13], "prefill_local_window_size": 16,
       "generate_local_window_size": 16}


@pytest.mark.parametrize("extra, mode, windows", [
    ({}, "sepllm", [16, 16]),
    ({"USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": True, "prefill_loc_win_size_list": [128, 8]}, "sepllm", [128, 8]),
    ({"streamingLLM": True}, "streamingllm", [16, 16]),
    ({"USE_FIXED_SEP_INTERVALs": True, "fixed_sep_intervals_list": [5, 5]}, "fixllm", [16, 16]),
    ({"USE_SA_SOFTMAX": True, "separator_token_ids": [-1]}, "sa", [16, 16]),
    ({"USE_SA_SOFTMAX_NO_DENO": True, "separator_token_ids": None}, "sa_no_deno", [16, 16]),
    ({"USE_ORIGINAL_FULL_ATTEN": True}, "full", [128, 128]),
])
def test_sepllm_modes(extra, mode, windows) -> None:
    cfg = load_config({**SEP, **extra})
    assert cfg.sepllm.mode == mode
    assert cfg.sepllm.prefill_windows == windows
    assert cfg.sepllm.generate_windows == ([128, 128] if mode == "full" else [16, 16])


def test_plain_config_is_full_attention_and_logged(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="megatron.config"):
        cfg = load_config(dict(TINY))
    assert cfg.sepllm.mode == "full" and cfg.sepllm.USE_ORIGINAL_FULL_ATTEN
    assert cfg.sepllm.separator_token_ids == [-1] and cfg.sepllm.init_tok_max_idx == -1
    messages = [r.getMessage() for r in caplog.records if r.name == "megatron.config"]
    assert sum("No SepLLM key" in m for m in messages) == 1
    assert not any("forced" in m for m in messages)


def test_sep_attention_impl_alone_keeps_plain_config() -> None:
    cfg = load_config(dict(TINY), overrides=["--sep_attention_impl", "compact"])
    assert cfg.sepllm.mode == "full" and cfg.sepllm.sep_attention_impl == "compact"


def test_forced_changes_are_logged(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="megatron.config"):
        cfg = load_config({**SEP, "USE_ORIGINAL_FULL_ATTEN": True, "USE_BiPE": True, "BiPE_seps": [15],
                           "attention-config": [[["flash"], 2]]})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "separator_token_ids forced from [15, 13] to [-1]" in text
    assert "prefill_local_window_size forced from 16 to 128" in text
    assert "USE_BiPE forced from True to False" in text
    assert "attention_config forced to all 'global'" in text
    assert cfg.sepllm.USE_SEP_ATTN_KERNEL_ACCELERATOR is False and cfg.model.attention_config == ["global"] * 2

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="megatron.config"):
        cfg = load_config({**SEP, "streamingLLM": True, "USE_SEP_ATTN_KERNEL_ACCELERATOR": True})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert cfg.sepllm.mode == "streamingllm" and cfg.sepllm.separator_token_ids == [-1]
    assert "separator_token_ids forced from [15, 13] to [-1] (streamingLLM=True" in text
    assert "USE_SEP_ATTN_KERNEL_ACCELERATOR=True only selects the fastest execution path" in text


def test_bipe_forces_rope_fusion_off() -> None:
    cfg = load_config({**SEP, "USE_BiPE": True, "BiPE_seps": [15, 13], "rope_fusion": True, "pos-emb": "alibi"})
    assert cfg.sepllm.USE_BiPE and cfg.model.rope_fusion is False


# ----------------------------------------------------------------------------------------------- reference configs
REFERENCE = {
    "sepllm-160m-on-pythia-with-pile_deduped-n128HT-NOkernel.yml": ("sepllm", [2048] + [128] * 10 + [2048]),
    "sepllm-160m-on-pythia-with-pile_deduped-n64-kernel.yml": ("sepllm", [64] * 12),
    "streamingllm-160m-n64.yml": ("streamingllm", [64] * 12),
    "vanilla-160m-full-attention.yml": ("full", [2048] * 12),
    "llama3_sepllm_a3_n256.yml": ("sepllm", [256] * 32),
    "llama3_streamingllm_a3_n256.yml": ("streamingllm", [256] * 32),
}


def test_every_reference_config_is_covered(reference_configs_dir: Path) -> None:
    assert sorted(p.name for p in (reference_configs_dir).glob("*.yml")) == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_configs_load(reference_configs_dir: Path, tmp_path: Path, name: str) -> None:
    data = tmp_path / "data_text_document"
    vocab = tmp_path / "tokenizer.json"
    path_overrides = ["--train-data-paths", f"[{data}]", "--valid-data-paths", f"[{data}]",
                      "--test-data-paths", f"[{data}]", "--vocab-file", str(vocab)]
    mode, windows = REFERENCE[name]
    src = reference_configs_dir / name
    if name.startswith("llama3"):
        cfg = load_config(src, overrides=path_overrides)
        assert cfg.sepllm.Layer_num == 32 and cfg.model.num_layers == 2  # Layer_num never sets num_layers
        with pytest.raises(ConfigError, match=r"describes 32 layers \(Layer_num=32\).*num_layers=2"):
            load_config(src, overrides=path_overrides + ["--train-iters", "10"], for_training=True)
        trained = load_config(src, overrides=path_overrides + ["--train-iters", "10", "--num-layers", "32"],
                              for_training=True)
        assert trained.sepllm.prefill_windows == windows
    else:
        cfg = load_config(src, overrides=path_overrides, for_training=True)
        assert cfg.model.num_layers == 12 and cfg.model.hidden_size == 768 and cfg.model.rotary_pct == 0.25
        assert cfg.training.precision == "fp16" and cfg.training.zero_stage == 1
        assert cfg.optimizer.type == "Adam" and cfg.optimizer.betas == [0.9, 0.95] and cfg.optimizer.lr == 6e-4
        assert cfg.lr_schedule.warmup_iters == 1430 and cfg.lr_schedule.lr_decay_style == "cosine"
        assert cfg.tokenizer.tokenizer_type == "HFTokenizer" and cfg.tokenizer.vocab_file == str(vocab)
        assert cfg.data.train_data_paths == [str(data)]
        assert cfg.checkpoint.extra_save_iters[-1] == 512 and cfg.launcher.launcher == "pdsh"
    assert cfg.sepllm.mode == mode and cfg.sepllm.prefill_windows == windows


# ----------------------------------------------------------------------------------------------- round trip
def _rich_config() -> dict:
    return {**SEP, "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": True, "prefill_loc_win_size_list": [128, 8],
            "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "world_size": 2, "train-iters": 50,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
            "bf16": {"enabled": True}, "flops_profiler": {"enabled": False}, "launcher": "slurm",
            "env": {"NCCL_DEBUG": "INFO"}, "wandb_mode": "offline", "eval_tasks": ["piqa"]}


@pytest.mark.parametrize("source", ["rich", "llama3", "vanilla"])
def test_round_trip(reference_configs_dir: Path, tmp_path: Path, source: str) -> None:
    if source == "rich":
        cfg = load_config(_rich_config())
    else:
        name = "llama3_sepllm_a3_n256.yml" if source == "llama3" else "vanilla-160m-full-attention.yml"
        cfg = load_config(reference_configs_dir / name)
    saved = _write(tmp_path / "resolved.yml", cfg.to_yaml())
    again = load_config(saved)
    assert isinstance(again, NeoXConfig) and again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_saved_config_recomputes_derived_values(tmp_path: Path, reference_configs_dir: Path) -> None:
    cfg = load_config(reference_configs_dir / "streamingllm-160m-n64.yml")
    saved = yaml.safe_load(cfg.to_yaml())
    assert "lr_schedule.warmup_iters" in saved["derived_keys"] and "sepllm.mode" in saved["derived_keys"]
    assert "training.train_micro_batch_size_per_gpu" not in saved["derived_keys"]
    assert saved["lr_schedule"]["warmup_iters"] == 1430  # written so the file shows what ran
    path = _write(tmp_path / "resolved.yml", cfg.to_yaml())
    resumed = load_config(path, overrides=["--train-iters", "2000", "--seq-length", "1024"])
    assert resumed.lr_schedule.lr_decay_iters == 143000  # given in the original file, so kept
    assert resumed.model.max_position_embeddings == 2048  # given in the original file
    plain = load_config({**TINY, "train-iters": 100})
    moved = load_config(_write(tmp_path / "plain.yml", plain.to_yaml()), overrides=["--train-iters", "2000",
                                                                                   "--seq-length", "64"])
    assert moved.lr_schedule.lr_decay_iters == 2000 and moved.lr_schedule.warmup_iters == 20
    assert moved.model.max_position_embeddings == 64 and moved.sepllm.prefill_windows == [64, 64]
    # a pinned global batch stays pinned through a saved config
    pinned = load_config({**TINY, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4})
    again = load_config(_write(tmp_path / "pinned.yml", pinned.to_yaml()))
    assert again.deepspeed_config(2)["gradient_accumulation_steps"] == 2
    assert again.deepspeed_config(4)["train_batch_size"] == 16
    with pytest.raises(ConfigError, match=r"'derived_keys' lists 'model.num_layers', which is not a derived value"):
        load_config({**TINY, "derived_keys": ["model.num_layers"]})


def test_config_built_in_code_round_trips_its_values(tmp_path: Path) -> None:
    cfg = NeoXConfig()  # what tests and tools do: set fields directly, no provenance
    cfg.training.train_iters, cfg.lr_schedule.lr_decay_iters, cfg.lr_schedule.warmup_iters = 10, 8, 3
    cfg.sepllm.USE_ORIGINAL_FULL_ATTEN = True
    again = load_config(_write(tmp_path / "code.yml", cfg.to_yaml()))
    assert again.lr_schedule.lr_decay_iters == 8 and again.lr_schedule.warmup_iters == 3
    assert again.sepllm.mode == "full" and again.sepllm.prefill_windows == [2048, 2048]


def test_gpu_build_detection_without_importing_torch() -> None:
    from megatron.device import torch_build_has_gpu

    cpu = "__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n"
    assert not torch_build_has_gpu(cpu)
    assert torch_build_has_gpu("__version__ = '2.5.1'\ncuda: Optional[str] = '12.4'\nhip: Optional[str] = None\n")
    assert torch_build_has_gpu("cuda = None\nhip = '6.2.4'\n")


# ----------------------------------------------------------------------------------------------- DeepSpeed view
def test_deepspeed_config(reference_configs_dir: Path) -> None:
    cfg = load_config(reference_configs_dir / "streamingllm-160m-n64.yml")
    ds = cfg.deepspeed_config(8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        1024, 32, 4)
    assert ds["optimizer"] == {"type": "Adam", "params": {"lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95],
                                                          "eps": 1e-8}}
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["initial_scale_power"] == 12
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 1.0
    assert ds["steps_per_print"] == 10 and ds["wall_clock_breakdown"] is True
    assert "optimizer" not in cfg.deepspeed_config(8, client_optimizer=True)

    rich = load_config(_rich_config())
    ds = rich.deepspeed_config(2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16, 4, 2)
    assert ds["optimizer"] == {"type": "SGD", "params": {"lr": 0.1, "weight_decay": 0.1, "momentum": 0.9,
                                                         "nesterov": True}}
    assert ds["bf16"] == {"enabled": True} and ds["flops_profiler"] == {"enabled": False}
    # the user pinned the global batch (with the micro batch): on 4 ranks accumulation adapts
    assert rich.deepspeed_config(4)["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="not divisible"):
        rich.deepspeed_config(8)


@pytest.mark.parametrize("name", ["sepllm-160m-on-pythia-with-pile_deduped-n64-kernel.yml",
                                  "vanilla-160m-full-attention.yml"])
def test_deepspeed_accepts_the_generated_config(reference_configs_dir: Path, name: str) -> None:
    from deepspeed.runtime import config as ds_config  # a hard dependency: a missing one must fail, not skip
    cfg = load_config(reference_configs_dir / name)
    assert "fp16" not in cfg.training.fp16 and "cpu_offload" not in cfg.training.zero_optimization
    parsed = ds_config.DeepSpeedConfig(cfg.deepspeed_config(1))  # world size 1 outside torch.distributed
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (
        cfg.training.train_batch_size, cfg.training.train_micro_batch_size_per_gpu,
        cfg.training.gradient_accumulation_steps)
    assert parsed.zero_optimization_stage == 1
    assert parsed.float16_config.enabled and parsed.float16_config.initial_scale_power == 12
    assert parsed.optimizer_name == "adam" and parsed.optimizer_params["lr"] == 6e-4
    assert parsed.gradient_clipping == 1.0 and parsed.steps_per_print == 10 and parsed.wall_clock_breakdown


def test_choice_fields_are_literal_types_read_from_one_place() -> None:
    """The choices of a key are its field's Literal type; validation and the model read the same tuple."""
    import typing

    from megatron.config import derived
    from megatron.config._loading.coerce import coerce, describe
    from megatron.config.model import ModelConfig

    hint = typing.get_type_hints(ModelConfig)["pos_emb"]
    assert typing.get_args(hint) == derived.POS_EMBS == ("learned", "rotary", "alibi", "sinusoidal", "none")
    assert describe(hint) == "one of learned, rotary, alibi, sinusoidal, none"
    assert coerce("rotary", hint, "model.pos_emb") == "rotary"
    with pytest.raises(ConfigError, match="model.pos_emb"):
        coerce(["rotary"], hint, "model.pos_emb")


def test_every_choice_key_is_typed_with_its_literal() -> None:
    """A key with a fixed set of values has one list of them: its field's Literal, from which validation's tuple is
    derived (the tokenizer package, one layer down, must list the same tokenizer types)."""
    import typing

    from megatron.config import derived
    from megatron.config.generation import KV_CACHE_KINDS, TEXT_GEN_TYPES, GenerationConfig
    from megatron.config.model import ModelConfig
    from megatron.config.neox import SECTIONS
    from megatron.config.sepllm import SepLLMConfig
    from megatron.config.sepllm_settings import MODES, SEP_ATTENTION_IMPLS
    from megatron.device import DEVICES
    from megatron.tokenizer import TOKENIZER_TYPES

    choices = {
        ("model", "pos_emb"): derived.POS_EMBS, ("model", "norm"): derived.NORMS,
        ("model", "activation"): derived.ACTIVATIONS, ("model", "precision"): derived.PRECISIONS,
        ("model", "attention_type"): derived.ATTENTION_TYPES, ("sepllm", "mode"): MODES,
        ("sepllm", "sep_attention_impl"): SEP_ATTENTION_IMPLS, ("optimizer", "type"): derived.OPTIMIZER_TYPES,
        ("lr_schedule", "lr_decay_style"): derived.LR_DECAY_STYLES,
        ("lr_schedule", "wsd_decay_style"): derived.WSD_DECAY_STYLES, ("data", "data_impl"): derived.DATA_IMPLS,
        ("tokenizer", "tokenizer_type"): derived.TOKENIZER_TYPES, ("training", "precision"): derived.PRECISIONS,
        ("training", "device"): DEVICES, ("checkpoint", "checkpoint_scale"): derived.CHECKPOINT_SCALES,
        ("logging", "wandb_mode"): derived.WANDB_MODES, ("parallel", "distributed_backend"):
        derived.DISTRIBUTED_BACKENDS, ("launcher", "launcher"): derived.LAUNCHERS,
        ("generation", "text_gen_type"): TEXT_GEN_TYPES, ("generation", "kv_cache"): KV_CACHE_KINDS,
    }
    assert SECTIONS["model"] is ModelConfig and SECTIONS["sepllm"] is SepLLMConfig
    assert SECTIONS["generation"] is GenerationConfig
    for (section, name), values in choices.items():
        hint = typing.get_type_hints(SECTIONS[section])[name]
        literal = hint if typing.get_origin(hint) is typing.Literal else next(
            a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal)
        assert typing.get_args(literal) == tuple(v for v in values if v is not None), (section, name)
        assert None not in values or type(None) in typing.get_args(hint), (section, name)
    assert derived.TOKENIZER_TYPES == TOKENIZER_TYPES
