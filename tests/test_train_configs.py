"""The shipped training configs load unchanged and say what they claim (shape, batch, precision, ZeRO)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, layers, hidden, heads, lr, micro, accum_on_8", [
    ("pythia-160m", 12, 768, 12, 6e-4, 32, 4),
    ("pythia-410m", 24, 1024, 16, 3e-4, 16, 8),
    ("pythia-1.4b", 24, 2048, 16, 2e-4, 16, 8),
])
def test_pythia_configs(name, layers, hidden, heads, lr, micro, accum_on_8):
    cfg = load_config(str(CONFIGS / f"{name}.yml"), for_training=True)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (layers, hidden, heads, 2048)
    assert (m.pos_emb, m.rotary_pct, m.gpt_j_residual, m.no_weight_tying) == ("rotary", 0.25, True, True)
    assert cfg.optimizer.lr == pytest.approx(lr) and cfg.lr_schedule.min_lr == pytest.approx(lr / 10)
    assert cfg.lr_schedule.warmup_iters == 1430 and cfg.training.train_iters == 143000
    assert cfg.training.precision == "fp16" and cfg.training.zero_stage == 1
    ds = cfg.deepspeed_config(8, client_optimizer=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        1024, micro, accum_on_8)
    assert ds["fp16"]["enabled"] and ds["fp16"]["initial_scale_power"] == 12 and "optimizer" not in ds
    assert cfg.sepllm.mode == "sepllm" and cfg.sepllm.prefill_local_window_size == 64


def test_tiny_cpu_config():
    cfg = load_config(str(CONFIGS / "tiny-cpu.yml"), for_training=True)
    assert cfg.training.device == "cpu" and cfg.training.precision == "fp32"
    assert cfg.data.data_path == "data/pg19_sample/pg19_sample_text_document"
    assert cfg.checkpoint.save and cfg.logging.tensorboard_dir and cfg.sepllm.PRINT_KV_RATIO


def test_pythia_config_on_cpu_fails_before_any_work(tmp_path):
    from megatron.training import pretrain
    from megatron.device import DeviceConfigError

    cfg = load_config(str(CONFIGS / "pythia-160m.yml"),
                      overrides=["--device", "cpu", "--log-dir", str(tmp_path / "logs"), "--save", str(tmp_path)])
    with pytest.raises(DeviceConfigError, match="fp16"):
        pretrain(cfg)


@pytest.mark.parametrize("name, mode, impl", [
    ("tiny-cpu-sepllm", "sepllm", "compact"),
    ("tiny-cpu-streamingllm", "streamingllm", "dense"),
    ("tiny-cpu-full", "full", None),
])
def test_tiny_cpu_attention_variants(name, mode, impl):
    """The three comparison configs differ from tiny-cpu.yml only in their attention and run folders."""
    from megatron.model.attention_backend import build_attention_backend

    cfg = load_config(str(CONFIGS / f"{name}.yml"), for_training=True)
    base = load_config(str(CONFIGS / "tiny-cpu.yml"), for_training=True)
    assert cfg.sepllm.mode == mode
    assert cfg.model == base.model and cfg.training == base.training and cfg.data == base.data
    assert cfg.checkpoint.save == f"runs/{name}/checkpoints" and cfg.logging.log_dir == f"runs/{name}/logs"
    backend = build_attention_backend(cfg.model, cfg.sepllm)
    if impl is None:
        assert type(backend).__name__ == "CausalSDPABackend"
    else:
        assert backend.resolve_impl("cpu") == impl
