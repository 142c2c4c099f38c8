"""The training-loop glue for pipelines (megatron.training.pipeline_training), 2 gloo processes, with the trainer's
own building blocks (NeoXConfig.deepspeed_config, build_optimizer, build_engine, Batch)."""

from __future__ import annotations

import pytest
import torch

from megatron.config import NeoXConfig
from megatron.parallel.pipeline import PipelineConfigError
from test_pipeline import SEQ, VOCAB, micro_batches, sep_cfg, token_rows


def tiny_neox(pp: int, zero: int = 1) -> NeoXConfig:
    cfg = NeoXConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 3, 32, 4, SEQ
    m.pos_emb, m.padded_vocab_size = "rotary", VOCAB
    cfg.sepllm = sep_cfg(3)
    cfg.parallel.pipe_parallel_size = pp
    cfg.optimizer.type, cfg.optimizer.lr, cfg.optimizer.betas = "Adam", 1e-2, [0.9, 0.95]
    cfg.optimizer.eps, cfg.optimizer.weight_decay = 1e-4, 0.1  # eps: see test_pipeline.EPS
    t = cfg.training
    t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps, t.train_batch_size = 2, 2, 4
    t.batch_inputs = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
    t.zero_optimization, t.zero_stage = {"stage": zero}, zero
    t.gradient_clipping, t.seed, t.device, t.precision = 1.0, 7, "cpu", "fp32"
    cfg.logging.steps_per_print = 10 ** 9
    return cfg


def _loop_like_run(rank: int, world: int) -> None:
    from megatron.model.gpt import GPTModel
    from megatron.model.loss import lm_loss
    from megatron.training.pipeline_training import (build_pipeline_engine, load_pipeline_module_state,
                                                     pipeline_loop_eval, pipeline_loop_step, pipeline_module_state)
    from megatron.training.batches import Batch
    from megatron.training.engine import quiet_deepspeed_logs
    from megatron.training.optimizer import build_optimizer

    quiet_deepspeed_logs()
    cfg = tiny_neox(pp=2)
    run = build_pipeline_engine(cfg, "cpu", world)
    assert (run.num_stages, run.stage_id, run.dp_rank, run.dp_size) == (2, rank, 0, 1)
    assert run.engine.zero_optimization_stage() == 1
    assert run.engine.module.attention_backend is not None  # retention statistics stay reachable for the loop
    start = pipeline_module_state(run.engine)

    steps, gas = 2, run.gradient_accumulation_steps
    raw = micro_batches(token_rows(run.micro_batch * gas * (steps + 1), seed=5), run.micro_batch)
    batches = [Batch(tokens=t, labels=l, loss_mask=m) for t, l, m in raw]
    it = iter(batches)
    losses, norms = zip(*(pipeline_loop_step(run.engine, it) for _ in range(steps)))

    # reference: the plain model from the same initial weights, the trainer's optimizer, clipping at 1.0
    model = GPTModel(cfg.model, cfg.sepllm)
    model.load_state_dict(start)
    opt = build_optimizer(model, cfg.optimizer)
    ref_it = iter(batches)
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for _ in range(gas):
            b = next(ref_it)
            loss = lm_loss(model(b.tokens), b.labels, b.loss_mask)
            (loss / gas).backward()
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        assert float(losses[step]) == pytest.approx(total / gas, abs=1e-5)
        assert norms[step] == pytest.approx(float(norm), rel=1e-4)  # ZeRO-1 reports the cross-stage norm
    trained = pipeline_module_state(run.engine)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, atol=2e-6, rtol=1e-5, msg=name)

    # evaluation through the pipeline on held-out micro-batches = the plain model's loss
    held_out = batches[steps * gas:]
    with torch.no_grad():
        ref_eval = sum(float(lm_loss(model(b.tokens), b.labels, b.loss_mask)) for b in held_out) / len(held_out)
    assert pipeline_loop_eval(run.engine, iter(held_out), len(held_out)) == pytest.approx(ref_eval, abs=1e-5)

    # weights-only load: module AND ZeRO-1's fp32 master copy take the loaded weights (a step at lr 0 keeps them)
    load_pipeline_module_state(run.engine, start)
    for group in run.engine.optimizer.param_groups:
        group["lr"] = 0.0
    pipeline_loop_step(run.engine, iter(held_out))
    after = pipeline_module_state(run.engine)
    for name, tensor in start.items():
        torch.testing.assert_close(after[name], tensor, atol=1e-7, rtol=0, msg=name)


@pytest.mark.distributed
def test_pipeline_training_glue_matches_plain_model_zero1_sepllm():
    from parallel_spawn import run_distributed

    run_distributed(_loop_like_run, 2, timeout=180.0)


def test_build_refuses_zero2_and_bad_world_size():
    from megatron.training.pipeline_training import build_pipeline_engine

    with pytest.raises(PipelineConfigError, match="zero_optimization.stage = 2 with pipe_parallel_size = 2"):
        build_pipeline_engine(tiny_neox(2, zero=2), "cpu", 2)
    with pytest.raises(PipelineConfigError, match="world size 3 is not divisible"):
        build_pipeline_engine(tiny_neox(2), "cpu", 3)
    for plain in (0, 1):   # the one rule for the key: config.layout.pipeline_engine_stages
        with pytest.raises(PipelineConfigError, match=f"pipe_parallel_size = {plain} means no pipeline engine"):
            build_pipeline_engine(tiny_neox(plain), "cpu", 2)


def _bf16_close_to_fp32(rank: int, world: int) -> None:
    from megatron.training.pipeline_training import build_pipeline_engine, pipeline_loop_step
    from megatron.training.batches import Batch
    from megatron.training.engine import quiet_deepspeed_logs

    quiet_deepspeed_logs()
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_neox(pp=2)
        if precision == "bf16":
            cfg.training.bf16, cfg.training.precision = {"enabled": True}, "bf16"
        run = build_pipeline_engine(cfg, "cpu", world)
        assert next(run.engine.module.parameters()).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        raw = micro_batches(token_rows(8, seed=5), 2)
        it = iter([Batch(tokens=t, labels=l, loss_mask=m) for t, l, m in raw])
        losses[precision] = [float(pipeline_loop_step(run.engine, it)[0]) for _ in range(2)]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=2e-2), losses
    assert losses["bf16"] != losses["fp32"]  # bf16 really ran in bf16


@pytest.mark.distributed
def test_pipeline_bf16_zero1_trains_like_fp32():
    from parallel_spawn import run_distributed

    run_distributed(_bf16_close_to_fp32, 2, timeout=180.0)


def _pp2_dp2(rank: int, world: int) -> None:
    """4 ranks = 2 pipelines of 2 stages; each pipeline reads its data-parallel slice. Reference: the plain model
    with micro-batch 2m over the same global batch."""
    from megatron.model.gpt import GPTModel
    from megatron.model.loss import lm_loss
    from megatron.training.pipeline_training import build_pipeline_engine, pipeline_loop_step, pipeline_module_state
    from megatron.training.batches import Batch
    from megatron.training.engine import quiet_deepspeed_logs
    from megatron.training.optimizer import build_optimizer

    quiet_deepspeed_logs()
    cfg = tiny_neox(pp=2)
    run = build_pipeline_engine(cfg, "cpu", world)
    assert (run.num_stages, run.dp_size) == (2, 2)
    assert run.stage_id == rank // 2 and run.dp_rank == rank % 2  # (pipe, data) order, as megatron.parallel.mesh
    start = pipeline_module_state(run.engine)
    micro, gas, steps = run.micro_batch, run.gradient_accumulation_steps, 2
    rows = token_rows(micro * gas * steps * 2, seed=9)
    mine = micro_batches(rows[run.dp_rank::2], micro)
    losses = [float(pipeline_loop_step(run.engine, iter([Batch(*b) for b in mine[s * gas:(s + 1) * gas]]))[0])
              for s in range(steps)]

    model = GPTModel(cfg.model, cfg.sepllm)
    model.load_state_dict(start)
    opt = build_optimizer(model, cfg.optimizer)
    both = [micro_batches(rows[r::2], micro) for r in range(2)]
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for i in range(step * gas, (step + 1) * gas):
            tokens, labels, mask = (torch.cat([both[0][i][k], both[1][i][k]]) for k in range(3))
            loss = lm_loss(model(tokens), labels, mask)
            (loss / gas).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        assert losses[step] == pytest.approx(total / gas, abs=1e-5)
    trained = pipeline_module_state(run.engine)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_times_dp2_on_four_ranks_matches_plain_model():
    from parallel_spawn import run_distributed

    run_distributed(_pp2_dp2, 4, timeout=300.0)
