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

