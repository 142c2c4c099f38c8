"""``sep_attention_impl: auto`` follows the measured table (megatron/sepllm/attention/auto_table.py); the benchmark writes it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.sepllm.attention import auto_table
from megatron.sepllm.attention.backend import SepLLMBackend

REPO = Path(__file__).resolve().parents[1]


def _table(tmp_path: Path, entries: list[dict], device: str = "cpu") -> Path:
    path = tmp_path / "table.json"
    auto_table.write_table(device, entries, {"test": True}, path)
    return path


def _backend(impl: str = "auto", window: int = 16) -> SepLLMBackend:
    cfg = SepLLMConfig(separator_token_ids=[5], mode="sepllm", prefill_windows=[window], generate_windows=[window],
                       init_tok_max_idx=0, sep_attention_impl=impl)
    return SepLLMBackend(cfg, ModelConfig(num_layers=1))


def test_lookup_floor_length_nearest_window(tmp_path):
    path = _table(tmp_path, [{"seq": 1024, "window": 64, "impl": "dense"},
                             {"seq": 1024, "window": 256, "impl": "compact"},
                             {"seq": 4096, "window": 256, "impl": "flex"}])
    assert auto_table.lookup("cpu", 1024, 64, path) == "dense"
    assert auto_table.lookup("cpu", 2048, 200, path) == "compact"      # floor length 1024, nearest window 256
    assert auto_table.lookup("cpu", 2048, 100, path) == "dense"        # nearest window 64
    assert auto_table.lookup("cpu", 100_000, 64, path) == "flex"       # longest measured length <= S
    assert auto_table.lookup("cpu", 512, 256, path) is None            # below the measured range: the rule
    assert auto_table.lookup("cuda", 4096, 256, path) is None          # no entries for this device type
    assert auto_table.lookup("cpu", None, 256, path) is None


def test_write_keeps_other_devices_and_bad_table_names_file(tmp_path):
    path = _table(tmp_path, [{"seq": 64, "window": 16, "impl": "dense"}], device="cuda")
    auto_table.write_table("cpu", [{"seq": 64, "window": 16, "impl": "compact"}], {}, path)
    table = json.loads(path.read_text())
    assert table["cuda"]["entries"][0]["impl"] == "dense" and table["cpu"]["entries"][0]["impl"] == "compact"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cpu": {"entries": [{"seq": 64, "window": 16, "impl": "fast"}]}}))
    with pytest.raises(auto_table.AutoTableError, match=r"bad\.json: cpu\.entries\[0\]"):
        auto_table.load_table(bad)


def test_table_entries_pick_fastest_trainable_path():
    rows = [dict(impl="sdpa_causal", S=64, w=16, fwd_bwd_ms=1.0, fwd_bwd_ratio_vs_causal=1.0),
            dict(impl="compact", S=64, w=16, fwd_bwd_ms=3.0, fwd_bwd_ratio_vs_causal=3.0),
            dict(impl="dense", S=64, w=16, fwd_bwd_ms=2.0, fwd_bwd_ratio_vs_causal=2.0),
            dict(impl="flex", S=64, w=16, fwd_bwd_ms=None, fwd_bwd_ratio_vs_causal=None),   # no CPU backward
            dict(impl="compact", S=128, w=16, fwd_bwd_ms=4.0, fwd_bwd_ratio_vs_causal=0.5),
            dict(impl="dense", S=128, w=16, fwd_bwd_ms=5.0, fwd_bwd_ratio_vs_causal=0.6)]
    assert auto_table.table_entries(rows) == [
        {"seq": 64, "window": 16, "impl": "dense", "fwd_bwd_ratio_vs_causal": 2.0, "candidates": ["compact", "dense"]},
        {"seq": 128, "window": 16, "impl": "compact", "fwd_bwd_ratio_vs_causal": 0.5,
         "candidates": ["compact", "dense"]}]


def test_backend_auto_consults_table(tmp_path, monkeypatch):
    path = _table(tmp_path, [{"seq": 64, "window": 16, "impl": "dense"}])
    monkeypatch.setattr(auto_table, "TABLE_PATH", path)
    backend = _backend()
    assert backend.resolve_impl(torch.device("cpu"), 64) == "dense"
    assert backend.resolve_impl(torch.device("cpu"), 32) == "compact"      # below the table: the rule
    assert backend.resolve_impl(torch.device("cuda"), 64) == "flex_compact"   # no cuda entries: the rule
    ids = torch.randint(0, 10, (1, 80))
    assert backend.prepare(ids, torch.arange(80)[None], None).impl == "dense"
    assert _backend("compact").prepare(ids, torch.arange(80)[None], None).impl == "compact"   # explicit wins


def test_shipped_table_is_valid_and_cuda_is_the_rule():
    table = auto_table.load_table(auto_table.TABLE_PATH)
    assert table["cuda"]["entries"] == []
    for e in table.get("cpu", {}).get("entries", []):
        assert e["seq"] >= 1024 and e["impl"] in ("compact", "dense")   # measured lengths; CPU flex cannot train


def test_benchmark_writes_the_fastest_path(tmp_path):
    out, table = tmp_path / "rows.json", tmp_path / "auto.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sep_attention.py"), "--seq-lens", "64", "128",
                           "--windows", "16", "--impls", "compact", "dense", "--heads", "2", "--head-dim", "8",
                           "--repeats", "1", "--threads", "1", "--json", str(out), "--write-auto-table", str(table)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    entries = json.loads(table.read_text())["cpu"]["entries"]
    for s in (64, 128):
        fastest = min((r for r in rows if r["S"] == s and r["impl"] in ("compact", "dense")),
                      key=lambda r: r["fwd_bwd_ms"])
        assert [e["impl"] for e in entries if e["seq"] == s and e["window"] == 16] == [fastest["impl"]]
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sep_attention.py"), "--no-backward",
                          "--write-auto-table", str(table)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "needs forward+backward" in bad.stderr


def test_auto_never_picks_a_missing_triton_and_the_benchmark_refuses_it_off_cuda(tmp_path, monkeypatch):
    path = _table(tmp_path, [{"seq": 64, "window": 16, "impl": "triton"}], device="cuda")
    monkeypatch.setattr(auto_table, "TABLE_PATH", path)
    backend = _backend()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else
                        real_find_spec(name, *a))
    assert backend.resolve_impl(torch.device("cuda"), 64) == "flex_compact"     # measured, but not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert backend.resolve_impl(torch.device("cuda"), 64) == "triton"
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sep_attention.py"), "--impls", "triton",
                          "compact"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "runs on CUDA only" in bad.stderr
