"""``compile: true`` (per-block ``torch.compile``): 50 training iterations of a tiny model through the trainer's
stepper, compiled and with ``fused_cross_entropy``, give the eager losses within fp32 noise; checkpoints keep their keys; a
block that cannot compile runs eagerly after one warning that names why."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron.config import load_config
from megatron.config.model import ModelConfig
from megatron.model.compile import BlockCompiler
from megatron.model.gpt import GPTModel
from megatron.training.batches import Batch

VOCAB = 64


def _losses(compile_: bool, fused: bool, iters: int = 50) -> list[float]:
    from megatron.training.distributed import init_distributed
    from megatron.training.engine import quiet_deepspeed_logs
    from megatron.training.parallel_setup import plan_parallel
    from megatron.training.steppers import build_stepper

    cfg = load_config({"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 16,
                       "max-position-embeddings": 16, "pos-emb": "rotary", "no-weight-tying": True,
                       "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                       "optimizer": {"type": "Adam", "params": {"lr": 3e-3}}, "compile": compile_,
                       "fused_cross_entropy": fused, "fused_cross_entropy_chunk": 12, "device": "cpu"})
    cfg.model.padded_vocab_size = VOCAB
    info = init_distributed("cpu")
    quiet_deepspeed_logs()
    torch.manual_seed(0)
    plan = plan_parallel(cfg, info, "cpu")
    stepper = build_stepper(cfg, plan, info, "cpu", cfg.deepspeed_config(1, client_optimizer=True), True)
    g = torch.Generator().manual_seed(1)

    pool = [torch.randint(0, VOCAB, (2, 17), generator=g) for _ in range(3)]  # learnable: a few fixed batches

    def batches():
        for i in range(iters):
            ids = pool[i % len(pool)]
            yield Batch(ids[:, :-1], ids[:, 1:], torch.ones(2, 16))

    it = batches()
    logged: list[str] = []
    if stepper.first_step is not None:
        stepper.first_step.log = logged.append
    losses = [float(stepper.train_step(it)[0]) for _ in range(iters)]
    if compile_:
        assert len(logged) == 1 and logged[0].startswith("compile: 2 transformer blocks compiled; first step"), logged
        assert stepper.first_step.compiler.failed is None
        assert not any("_orig_mod" in k for k in stepper.engine.module.state_dict())  # checkpoint keys as eager
    return losses


@pytest.mark.slow
def test_compiled_training_matches_eager_for_50_iterations():
    eager = _losses(False, False)
    assert eager[-1] < eager[0] - 0.3  # it trains
    # compiled blocks + the fused loss (the compiled plain loss is one small graph; one compiled run keeps this short)
    torch.testing.assert_close(_losses(True, True), eager, atol=2e-4, rtol=1e-4)


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise torch._dynamo.exc.BackendCompilerFailed(fn, RuntimeError("inductor: no C++ compiler found\nmore"),
                                                          None)
        return call

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, padded_vocab_size=VOCAB)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    ids = torch.randint(0, VOCAB, (1, 8))
    expected = model(ids)
    keys = list(model.state_dict())
    monkeypatch.setattr(torch, "compile", broken_compile)
    compiler = BlockCompiler(model)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(model(ids), expected)
        torch.testing.assert_close(model(ids), expected)
    warnings = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert warnings == ["compile: 2 transformer blocks run eagerly from here on (torch.compile failed: "
                        "RuntimeError: inductor: no C++ compiler found)"]
    assert compiler.failed.startswith("RuntimeError") and compiler.summary(1.0).startswith("compile: fell back")
    assert list(model.state_dict()) == keys



def _train_compiled_layouts(rank: int, world_size: int, cfgs: list) -> None:
    import io

    from megatron.training.loop import pretrain

    for cfg in cfgs:  # one spawn for every layout: process start-up dominates these tiny runs
        stream = io.StringIO()
        pretrain(cfg, stream=stream)
        if rank != 0:  # rank 0 logs
            continue
        lines = [line for line in stream.getvalue().splitlines() if "compile:" in line]
        assert any("transformer blocks compiled with backend aot_eager" in line for line in lines), lines
        assert not any("eagerly" in line or "fell back" in line for line in lines), lines


@pytest.mark.distributed
def test_compiled_blocks_train_under_tensor_pipeline_and_zero3(corpus, neox_tokenizer_file, tmp_path):
    """``compile: true`` on tensor-parallel blocks (TP=2, sequence parallel), pipeline stages (PP=2) and ZeRO-3
    (DP=2, parameters gathered by hooks): every layout traces its blocks without falling back to eager, and trains to
    the one-process eager losses. ``aot_eager`` runs dynamo and AOT autograd on the same graphs as inductor without
    generating code (seconds instead of minutes); the inductor kernels themselves are checked by the 50-iteration test
    above."""
    import json

    from parallel_spawn import run_distributed
    from sep_helpers import make_sepllm_cfg
    from train_helpers import tiny_config

    from megatron.training.loop import pretrain

    def cfg_for(run: str, **overrides):
        cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path / run, train_iters=3, **overrides)
        cfg.sepllm = make_sepllm_cfg(num_layers=cfg.model.num_layers, window=8, sep_attention_impl="compact")
        cfg.model.padded_vocab_size = 50432
        return cfg

    ref = pretrain(cfg_for("ref", training__zero_optimization={"stage": 1}, training__zero_stage=1))
    compiled = {"training__compile": True, "training__compile_backend": "aot_eager"}
    layouts = {
        "tp2_sp": dict(parallel__model_parallel_size=2, parallel__sequence_parallel=True,
                       training__zero_optimization={"stage": 1}, training__zero_stage=1),
        "pp2": dict(parallel__pipe_parallel_size=2, training__zero_optimization={"stage": 1}, training__zero_stage=1),
        "zero3": dict(micro=1, training__zero_optimization={"stage": 3}, training__zero_stage=3),
    }
    run_distributed(_train_compiled_layouts, 2, [cfg_for(name, **compiled, **layout)
                                                 for name, layout in layouts.items()], timeout=300)
    for name in layouts:
        rows = [json.loads(line) for line in (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()]
        losses = {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}
        assert sorted(losses) == [1, 2, 3], name
        for it, want in ref.train_losses.items():
            assert losses[it] == pytest.approx(want, abs=1e-4), (name, it, losses[it], want)


def test_compiled_compact_sepllm_breaks_only_around_the_compact_call():
    """SepLLM ``compact`` under ``compile: true``: the compact engine (own autograd function, kernels and thread
    control) is excluded from the graph on purpose, so every graph break is that one call, and the forward and the
    gradients equal eager with document masks on."""
    from torch._dynamo.utils import counters

    from sep_helpers import make_sepllm_cfg

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, padded_vocab_size=VOCAB)
    sep = make_sepllm_cfg(num_layers=2, window=6, separator_token_ids=[5, 9], sep_attention_impl="compact")
    torch.manual_seed(0)
    eager, compiled = GPTModel(cfg, sep), GPTModel(cfg, sep)
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    ids[:, 12] = 0  # an end-of-document token: two documents per row
    docs = (ids == 0).long().cumsum(-1) - (ids == 0).long()
    torch._dynamo.reset()
    counters.clear()
    compiler = BlockCompiler(compiled, backend="aot_eager")
    outs = []
    for model in (eager, compiled):
        out = model(ids, document_ids=docs)
        out.float().pow(2).mean().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    assert compiler.failed is None
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    reasons = [reason for reason in counters["graph_break"]]
    assert reasons and all("compact_attention" in r for r in reasons), reasons
