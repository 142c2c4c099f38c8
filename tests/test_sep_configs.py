"""The Pythia-160M-shaped SepLLM / StreamingLLM / vanilla configs parse, load and drive the SepLLM backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from megatron.config.loader import load_config
from megatron.model.attention_backend import CausalSDPABackend, build_attention_backend

from sep_helpers import PYTHIA_SEPS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED = {
    # name: (mode, per-layer prefill windows)
    "sepllm-160m-n64": ("sepllm", [64] * 12),
    "sepllm-160m-n128": ("sepllm", [128] * 12),
    "sepllm-160m-n256": ("sepllm", [256] * 12),
    "sepllm-160m-n64H": ("sepllm", [2048] + [64] * 11),
    "sepllm-160m-n64HT": ("sepllm", [2048] + [64] * 10 + [2048]),
    "sepllm-160m-n128HT": ("sepllm", [2048] + [128] * 10 + [2048]),
    "streamingllm-160m-n64": ("streamingllm", [64] * 12),
    "vanilla-160m": ("full", None),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_config_parses_loads_and_builds_backend(name):
    path = CONFIGS / f"{name}.yml"
    text = path.read_text()
    assert text.startswith("#") and "Naming of this config family" in text
    raw = yaml.safe_load(text)
    assert raw["num-layers"] == 12 and raw["hidden-size"] == 768 and raw["seq-length"] == 2048
    assert raw["vocab-file"] == "megatron/tokenizer/assets/20B_tokenizer.json"  # bundled
    cfg = load_config(path)
    mode, windows = EXPECTED[name]
    assert cfg.sepllm.mode == mode
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (12, 768, 12)
    backend = build_attention_backend(cfg.model, cfg.sepllm)
    if mode == "full":
        assert isinstance(backend, CausalSDPABackend)
        return
    assert cfg.sepllm.prefill_windows == windows
    assert backend.resolve_impl(torch.device("cpu")) == "compact"
    expected_seps = PYTHIA_SEPS if mode == "sepllm" else None
    assert backend.separator_ids == expected_seps and backend.num_initial == 3
    ids = torch.randint(100, 1000, (1, 300))
    ids[0, ::7] = 15
    plan = backend.prepare(ids, torch.arange(300)[None], None)
    full_layers = [i for i, w in enumerate(windows) if w >= 300]
    assert [i for i, p in enumerate(plan.layer_patterns) if p.full] == full_layers
