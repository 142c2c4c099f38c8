"""Tensor / sequence parallelism: TP=2 (2 gloo processes) against the TP=1 model with the same weights --
logits, loss and every gradient -- for full attention, GQA, ALiBi/learned positions, SepLLM (compact and dense
paths) and sequence parallelism; TP checkpoint merge/split."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from megatron.config.model import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.model.loss import lm_loss
from megatron.parallel.reshard import is_gated, shard_spec, shard_tensor
from megatron.parallel.tensor_parallel import apply_tensor_parallel, gather_logits, loss_fn_for
from parallel_spawn import run_distributed
from sep_helpers import make_sepllm_cfg

VOCAB = 64
SEPS = [3, 5, 7, 11]
ATOL = 2e-5

CASES = {
    # Pythia-like: rotary (partial), parallel residual, untied head, LayerNorm, GELU, biases
    "neox": dict(pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True),
    # Llama-like GQA: 4 query heads over 2 KV groups, SwiGLU (value/gate halves split separately), RMSNorm, no biases
    "llama_gqa": dict(pos_emb="rotary", num_kv_heads=2, activation="swiglu", intermediate_size=48, norm="rmsnorm",
                      no_weight_tying=True, use_bias_in_attn_linear=False, use_bias_in_mlp=False),
    # ALiBi (per-rank slope slice), tied embeddings (vocab-parallel head = embedding shard), sequential residual
    "alibi_tied": dict(pos_emb="alibi", no_weight_tying=False),
    # learned absolute positions, GPT-J tied norm
    "learned_tied_norm": dict(pos_emb="learned", gpt_j_residual=True, gpt_j_tied=True, no_weight_tying=True),
}


def _model_cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, padded_vocab_size=VOCAB)
    base.update(kw)
    return ModelConfig(**base)


def _sep_cfg(impl: str):
    return make_sepllm_cfg(num_layers=2, separator_token_ids=SEPS, prefill_windows=[4, 8], sep_attention_impl=impl)


def _batch(seq: int = 32):
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, VOCAB, (2, seq + 1), generator=g)
    mask = torch.ones(2, seq)
    mask[1, -5:] = 0.0
    return ids[:, :-1], ids[:, 1:], mask


def _compare(rank: int, ref: GPTModel, tp: GPTModel, label: str, sequence_parallel: bool = False,
             documents: bool = False) -> None:
    """Forward/backward both models on the same batch; compare logits, loss and all gradients. ``documents``: the
    batch packs documents (end-of-document token 0) with restarted positions and document masks."""
    ids, labels, mask = _batch()
    inputs = {}
    if documents:
        from megatron.data.documents import document_ids, document_positions

        ids = ids.clone()
        ids[0, [6, 7, 20]] = 0
        ids[1, 12] = 0
        docs = document_ids(ids, 0)
        inputs = {"document_ids": docs, "position_ids": document_positions(docs)}
    ref_logits = ref(ids, **inputs)
    ref_loss = lm_loss(ref_logits, labels, mask)
    ref_loss.backward()
    local = tp(ids, **inputs)
    assert local.shape[-1] == VOCAB // 2, (label, local.shape)
    loss = loss_fn_for(tp)(local, labels, mask)
    loss.backward()
    full = gather_logits(local, tp)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 64\)"):
        loss_fn_for(tp)(local, labels + VOCAB, mask)
    torch.testing.assert_close(full, ref_logits, atol=ATOL, rtol=1e-4, msg=lambda m: f"{label} logits: {m}")
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=1e-5, msg=lambda m: f"{label} loss: {m}")
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in tp.named_parameters()]
    assert sorted(names) == sorted(ref_params), label
    for name, p in tp.named_parameters():
        expect = ref_params[name].grad
        spec = shard_spec(name, is_gated(tp.cfg))
        if spec is not None:
            expect = shard_tensor(expect, spec, rank, 2, name)
        assert p.grad is not None, f"{label}: no gradient for {name}"
        torch.testing.assert_close(p.grad, expect, atol=ATOL, rtol=1e-4, msg=lambda m: f"{label} grad {name}: {m}")


def _build_pair(cfg: ModelConfig, sep=None, sequence_parallel: bool = False):
    torch.manual_seed(0)
    ref = GPTModel(cfg, sep)
    tp = apply_tensor_parallel(copy.deepcopy(ref), dist.group.WORLD, sequence_parallel=sequence_parallel)
    return ref, tp


def _dense_cases(rank: int, world: int) -> None:
    from megatron.parallel.tensor_parallel import clip_tp_grad_norm_, tp_grad_norm

    for name, kw in CASES.items():
        cfg = _model_cfg(**kw)
        ref, tp = _build_pair(cfg)
        _compare(rank, ref, tp, name)
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
        torch.testing.assert_close(tp_grad_norm(tp), ref_norm, atol=1e-6, rtol=1e-5)
        assert float(ref_norm) > 0.01
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
        clip_tp_grad_norm_(tp, 0.01)
        torch.testing.assert_close(tp_grad_norm(tp), tp_grad_norm(ref), atol=1e-7, rtol=1e-5)


def _sepllm_cases(rank: int, world: int) -> None:
    for impl in ("compact", "dense"):
        for name in ("neox", "llama_gqa"):
            cfg = _model_cfg(**CASES[name])
            ref, tp = _build_pair(cfg, _sep_cfg(impl))
            # the SepLLM backend really sparsifies here (window 4/8 < 32 tokens): the run is not plain causal
            assert ref.attention_backend.resolve_impl(torch.device("cpu")) == impl
            _compare(rank, ref, tp, f"sepllm-{impl}-{name}")
    # documents (reset_attention_mask + reset_position_ids): SepLLM compact and full attention
    for sep in (_sep_cfg("compact"), None):
        ref, tp = _build_pair(_model_cfg(**CASES["neox"]), sep)
        _compare(rank, ref, tp, f"documents-{'sepllm' if sep else 'full'}", documents=True)


def _sp_cases(rank: int, world: int) -> None:
    for name in ("neox", "llama_gqa", "alibi_tied"):
        ref, tp = _build_pair(_model_cfg(**CASES[name]), sequence_parallel=True)
        _compare(rank, ref, tp, f"sp-{name}", sequence_parallel=True)
    ref, tp = _build_pair(_model_cfg(**CASES["neox"]), _sep_cfg("compact"), sequence_parallel=True)
    _compare(rank, ref, tp, "sp-sepllm-compact", sequence_parallel=True)
    ref, tp = _build_pair(_model_cfg(**CASES["neox"], checkpoint_activations=True), sequence_parallel=True)
    _compare(rank, ref, tp, "sp-activation-checkpointing", sequence_parallel=True)


def _dropout_cases(rank: int, world: int) -> None:
    """Dropout under TP + SP: masks differ between TP ranks (per-rank generator), the shared RNG stays in step, and
    activation checkpointing recomputes the same masks (same loss and gradients as without it)."""
    cfg = _model_cfg(**CASES["neox"], hidden_dropout=0.2, attention_dropout=0.2)
    torch.manual_seed(0)
    base = apply_tensor_parallel(GPTModel(cfg), dist.group.WORLD, sequence_parallel=True)
    ckpt = copy.deepcopy(base)
    ckpt.cfg.checkpoint_activations = True
    assert not base.cfg.checkpoint_activations
    ids, labels, mask = _batch()
    seen = {}
    base.layers[0].attn_dropout.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    results = []
    for model in (base, ckpt):
        model.train()
        torch.manual_seed(5)
        loss = loss_fn_for(model)(model(ids), labels, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    from megatron.parallel.tensor_parallel import tp_grad_norm

    assert getattr(ckpt.layers[0].attention.dense.weight, "tensor_model_parallel", False)  # re-marked on the copy
    torch.testing.assert_close(tp_grad_norm(ckpt), tp_grad_norm(base), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    dropped = ((seen["y"] == 0) & (seen["x"] != 0)).to(torch.uint8)
    assert 0 < dropped.float().mean() < 0.5
    masks = [torch.empty_like(dropped) for _ in range(world)]
    dist.all_gather(masks, dropped)
    assert not torch.equal(masks[0], masks[1]), "TP ranks drew the same dropout mask"
    states = [torch.empty_like(torch.get_rng_state()) for _ in range(world)]
    dist.all_gather(states, torch.get_rng_state())
    assert torch.equal(states[0], states[1]), "shared RNG state diverged between TP ranks"


@pytest.mark.distributed
def test_tp_dropout_rng_per_rank_and_recompute():
    run_distributed(_dropout_cases, 2, timeout=120)


@pytest.mark.distributed
def test_tp2_matches_tp1_full_attention_and_gqa():
    run_distributed(_dense_cases, 2, timeout=120)


@pytest.mark.distributed
def test_tp2_matches_tp1_sepllm_compact_and_dense():
    run_distributed(_sepllm_cases, 2, timeout=120)


@pytest.mark.distributed
def test_tp2_sequence_parallel_matches_tp1():
    run_distributed(_sp_cases, 2, timeout=120)


# ------------------------------------------------------------------------------------------- checkpoints (resharding)
def _save_tp1_checkpoint(root, cfg: ModelConfig) -> GPTModel:
    """A trainer-format TP=1 checkpoint folder ``root/global_step3`` of the seed-0 model."""
    import json

    torch.manual_seed(0)
    model = GPTModel(cfg)
    step = root / "global_step3"
    step.mkdir(parents=True)
    torch.save(model.state_dict(), step / "model_states.pt")
    (step / "meta.json").write_text(json.dumps({"iteration": 3, "world_size": 1}))
    (root / "latest").write_text("global_step3\n")
    return model


def _checkpoint_cases(rank: int, world: int, root: str) -> None:
    from pathlib import Path

    from megatron.parallel.reshard import load_state_file, reshard_checkpoint, tp_model_file

    root = Path(root)
    ids, _, _ = _batch()
    for name in ("neox", "llama_gqa"):
        cfg = _model_cfg(**CASES[name])
        torch.manual_seed(0)
        ref = GPTModel(cfg)
        with torch.no_grad():
            ref_logits = ref(ids)
        # (1) TP=1 checkpoint split into TP=2 by the CLI (run by the test before spawning): loads and gives the logits
        torch.manual_seed(1)  # different weights before loading
        tp = apply_tensor_parallel(GPTModel(cfg), dist.group.WORLD)
        tp.load_state_dict(load_state_file(root / name / "tp2" / "global_step3" / tp_model_file(rank, 2)), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(gather_logits(tp(ids), tp), ref_logits, atol=ATOL, rtol=1e-4)
        # (2) a TP=2 model's per-rank state dicts merged to TP=1 give the same logits
        out = root / name / "from_tp2" / "global_step7"
        if rank == 0:
            out.mkdir(parents=True)
        dist.barrier()
        torch.save(tp.state_dict(), out / tp_model_file(rank, 2))
        dist.barrier()
        if rank == 0:
            merged_dir = reshard_checkpoint(out, root / name / "merged", 1)
            torch.manual_seed(2)
            plain = GPTModel(cfg)
            plain.load_state_dict(load_state_file(merged_dir / "model_states.pt"), strict=True)
            with torch.no_grad():
                torch.testing.assert_close(plain(ids), ref_logits, atol=ATOL, rtol=1e-4)
            for key, value in ref.state_dict().items():
                torch.testing.assert_close(plain.state_dict()[key], value, atol=0, rtol=0)
        dist.barrier()


@pytest.mark.distributed
def test_tp_checkpoint_split_and_merge_round_trip(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for name in ("neox", "llama_gqa"):
        _save_tp1_checkpoint(tmp_path / name / "tp1", _model_cfg(**CASES[name]))
        proc = subprocess.run([sys.executable, str(repo / "tools" / "ckpts" / "reshard_tp.py"), "--load",
                               str(tmp_path / name / "tp1"), "--save", str(tmp_path / name / "tp2"), "--tp", "2"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        step = tmp_path / name / "tp2" / "global_step3"
        assert sorted(p.name for p in step.iterdir()) == ["meta.json", "mp_rank_00_model_states.pt",
                                                           "mp_rank_01_model_states.pt"]
        assert (tmp_path / name / "tp2" / "latest").read_text().strip() == "global_step3"
    run_distributed(_checkpoint_cases, 2, str(tmp_path), timeout=120)


# ------------------------------------------------------------------------------------- pure functions (no processes)
def test_split_merge_round_trip_exact():
    from megatron.parallel.reshard import merge_tp_state_dicts, split_tp_state_dict

    for name in CASES:
        cfg = _model_cfg(**CASES[name])
        torch.manual_seed(0)
        state = GPTModel(cfg).state_dict()
        for tp in (2, 4):
            shards = split_tp_state_dict(state, tp)
            assert shards[0]["layers.0.attention.dense.weight"].shape == (32, 32 // tp)
            merged = merge_tp_state_dicts(shards)
            assert merged.keys() == state.keys()
            for key in state:
                assert torch.equal(merged[key], state[key]), (name, tp, key)


def test_gated_mlp_split_keeps_value_and_gate_halves():
    from megatron.parallel.reshard import infer_gated, merge_tensors, shard_spec, shard_tensor

    rows = torch.arange(8.0).unsqueeze(1)  # value rows 0..3, gate rows 4..7
    spec = shard_spec("layers.0.mlp.dense_h_to_4h.weight", gated=True)
    assert spec.dim == 0 and spec.stride == 2
    assert shard_tensor(rows, spec, 0, 2).flatten().tolist() == [0, 1, 4, 5]
    assert shard_tensor(rows, spec, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(merge_tensors([shard_tensor(rows, spec, r, 2) for r in range(2)], spec), rows)
    assert shard_spec("layers.0.mlp.dense_h_to_4h.weight", gated=False).stride == 1
    gated_state = GPTModel(_model_cfg(**CASES["llama_gqa"])).state_dict()
    assert infer_gated(gated_state) and not infer_gated(GPTModel(_model_cfg(**CASES["neox"])).state_dict())


def test_qkv_split_gives_whole_kv_groups():
    from megatron.parallel.reshard import shard_spec, shard_tensor

    cfg = _model_cfg(**CASES["llama_gqa"])  # 4 q heads, 2 kv heads, head_dim 8: group = [q, q, k, v] x 8 rows
    weight = GPTModel(cfg).state_dict()["layers.0.attention.query_key_value.weight"]
    spec = shard_spec("layers.0.attention.query_key_value.weight", gated=True)
    assert torch.equal(shard_tensor(weight, spec, 1, 2), weight[32:64])  # KV group 1: its 2 q heads, k, v
    assert shard_spec("layers.0.attention.dense.weight", True).dim == 1
    assert shard_spec("layers.0.attention.dense.bias", True) is None
    assert shard_spec("embed.word_embeddings.weight", False).dim == 0
    assert shard_spec("final_layernorm.weight", False) is None


@pytest.mark.parametrize("change,tp,needle", [
    (dict(num_attention_heads=4, num_kv_heads=1), 2, "num_kv_heads = 1 is not divisible by model_parallel_size = 2"),
    (dict(num_attention_heads=2, hidden_size=32), 4, "num_attention_heads = 2"),
    (dict(padded_vocab_size=66), 4, "padded_vocab_size = 66"),
    (dict(intermediate_size=30), 4, "intermediate_size (MLP width) = 30"),
])
def test_incompatible_model_names_the_key(change, tp, needle):
    from megatron.config.errors import ConfigError
    from megatron.config.layout import check_tp_split

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_tp_split(_model_cfg(**change), tp)


def test_sequence_parallel_needs_divisible_sequence():
    from megatron.config.errors import ConfigError
    from megatron.config.layout import check_tp_split

    check_tp_split(_model_cfg(seq_length=30), 2)
    with pytest.raises(ConfigError, match="seq_length"):
        check_tp_split(_model_cfg(seq_length=30), 4, sequence_parallel=True)


def test_merge_rejects_shards_from_different_checkpoints():
    from megatron.parallel.reshard import ReshardError, merge_tp_state_dicts, split_tp_state_dict

    state = GPTModel(_model_cfg(**CASES["neox"])).state_dict()
    shards = split_tp_state_dict(state, 2)
    shards[1]["final_layernorm.weight"] = shards[1]["final_layernorm.weight"] + 1
    with pytest.raises(ReshardError, match="final_layernorm.weight: replicated tensor differs"):
        merge_tp_state_dicts(shards)
    del shards[1]["final_layernorm.weight"]
    with pytest.raises(ReshardError, match="different keys"):
        merge_tp_state_dicts(shards)


def test_reshard_cli_errors_are_one_line(tmp_path, capsys):
    import runpy
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "ckpts" / "reshard_tp.py"
    main = runpy.run_path(str(tool), run_name="reshard_tp")["main"]
    assert main(["--load", str(tmp_path / "nope"), "--save", str(tmp_path / "o"), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint folder" in err
    step = tmp_path / "c" / "global_step1"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (step / "mp_rank_02_model_states.pt").write_bytes(b"")
    assert main(["--load", str(step), "--save", str(tmp_path / "o"), "--tp", "1"]) == 2
    assert "ranks [0, 2]" in capsys.readouterr().err
    (step / "mp_rank_02_model_states.pt").rename(step / "mp_rank_01_model_states.pt")
    assert main(["--load", str(step), "--save", str(tmp_path / "o"), "--tp", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable torch state dict" in err
    assert main(["--load", str(step), "--save", str(tmp_path / "o"), "--tp", "0"]) == 2
    assert "--tp 0" in capsys.readouterr().err
