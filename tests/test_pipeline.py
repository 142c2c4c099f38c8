"""Pipeline parallelism (megatron.parallel.pipeline) on DeepSpeed's PipelineEngine, 2 gloo processes.

Reference = the plain ``GPTModel`` with the same weights, the same micro-batches and a torch AdamW step (what the
non-pipeline trainer does: mean of the micro-batch losses, gradients of ``loss / gas``). Compared: the loss and the
full set of updated weights (gathered from all stages in GPTModel layout) after one and after two steps.
"""

from __future__ import annotations

import pytest
import torch

from megatron.config.errors import ConfigError
from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.model.gpt import GPTModel
from megatron.model.loss import lm_loss
from megatron.parallel.pipeline import PipelineConfigError, _deepspeed_partition_method, pipeline_lm_loss
from megatron.parallel.pipeline_stages import (EmbeddingPipe, FinalNormPipe, PipelineInputError, StageContext,
                                               TransformerLayerPipe, tied_head_forward)

SEPS = [5, 7, 11]
VOCAB = 128
SEQ = 24
LR = 1e-2
# AdamW eps well above gradient round-off: the key bias of attention has an exactly-zero true gradient (softmax is
# shift invariant), so its float noise (~1e-10) would be blown up to lr-sized updates by eps=1e-8 and make weight
# comparisons meaningless for that one tensor.
EPS = 1e-4


def tiny_cfg(num_layers: int = 2, **kw) -> ModelConfig:
    kw.setdefault("pos_emb", "rotary")
    return ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                       padded_vocab_size=VOCAB, **kw)


def sep_cfg(num_layers: int, impl: str = "compact", **kw) -> SepLLMConfig:
    return SepLLMConfig(separator_token_ids=list(SEPS), mode="sepllm", init_tok_max_idx=1,
                        prefill_windows=[4] * num_layers, generate_windows=[4] * num_layers,
                        prefill_local_window_size=4, generate_local_window_size=4, sep_attention_impl=impl, **kw)


def token_rows(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, SEQ + 1]`` ids with a separator about every 4th token (so SepLLM masks differ from causal ones)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(12, VOCAB, (n, SEQ + 1), generator=g)
    sep_at = torch.rand(n, SEQ + 1, generator=g) < 0.25
    seps = torch.tensor(SEPS)[torch.randint(0, len(SEPS), (n, SEQ + 1), generator=g)]
    return torch.where(sep_at, seps, ids)


def micro_batches(rows: torch.Tensor, micro: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, rows.shape[0], micro):
        chunk = rows[i:i + micro]
        mask = torch.ones(chunk.shape[0], SEQ)
        mask[:, :3] = 0.0  # a real loss mask, so the masked mean is what is compared
        out.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), mask))
    return out


def reference_steps(model: GPTModel, batches, gas: int, steps: int, clip: float = 0.0,
                    carried: list = None) -> tuple[list[float], dict]:
    """Plain model, AdamW (the trainer's parameter groups), ``steps`` optimizer steps of ``gas`` micro-batches,
    gradients clipped to global norm ``clip`` (0 = off; asserted to be active when set)."""
    from megatron.training.optimizer import param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR, eps=EPS)
    losses = []
    it = iter(batches)
    extra = iter(carried or [])
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for _ in range(gas):
            tokens, labels, mask = next(it)
            loss = lm_loss(model(tokens, **(next(extra) if carried else {})), labels, mask)
            (loss / gas).backward()
            total += float(loss.detach())
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            assert norm > clip  # clipping really happens, so the pipeline's cross-stage norm is tested
        opt.step()
        losses.append(total / gas)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def ds_config(micro: int, gas: int, dp: int, zero: int = 0, clip: float = 0.0) -> dict:
    return {"train_batch_size": micro * gas * dp, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas, "steps_per_print": 10 ** 9, "zero_optimization": {"stage": zero},
            "gradient_clipping": clip}


def _pipeline_vs_reference(rank: int, world: int, cfg: ModelConfig, sep, stages: int, micro: int, gas: int,
                           method: str, expect_parts, zero: int = 0, clip: float = 0.0,
                           documents: bool = False) -> None:
    import deepspeed

    from megatron.parallel.pipeline import (build_pipeline_model, carried_inputs, gather_gpt_state_dict,
                                            load_gpt_state_dict, pipeline_data_iter, pipeline_eval_loss,
                                            pipeline_train_step)
    from megatron.training.batches import Batch
    from megatron.training.engine import quiet_deepspeed_logs
    from megatron.training.optimizer import param_groups

    quiet_deepspeed_logs()
    steps = 2
    torch.manual_seed(0)
    reference = GPTModel(cfg, sep)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    batches = micro_batches(token_rows(micro * gas * steps), micro)
    carried = [document_batch(t) for t, _, _ in batches] if documents else None
    ref_losses, ref_state = reference_steps(reference, batches, gas, steps, clip, carried)

    def as_batches(n: int):
        return (Batch(tokens=t, labels=l, loss_mask=m, **(carried[i] if documents else {}))
                for i, (t, l, m) in enumerate(batches[:n]))

    pipe = build_pipeline_model(cfg, sep, stages, partition_method=method,
                                carries=carried_inputs(documents, documents))
    if expect_parts is not None:
        assert list(pipe.parts) == expect_parts
    load_gpt_state_dict(pipe, start)
    opt = torch.optim.AdamW(param_groups(pipe, 0.1), lr=LR, eps=EPS)
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=opt, config=ds_config(micro, gas, 1, zero, clip),
                                           dist_init_required=False)
    data = pipeline_data_iter(as_batches(len(batches)))
    losses = [float(pipeline_train_step(engine, data)) for _ in range(steps)]
    if cfg.checkpoint_activations:  # the transformer-layer chunks really went through torch.utils.checkpoint
        assert engine.module.activation_checkpoint_interval == cfg.checkpoint_num_layers
        assert engine.module.is_checkpointable_results and all(engine.module.is_checkpointable_results)
    assert losses == pytest.approx(ref_losses, abs=1e-5), (losses, ref_losses)
    gathered = gather_gpt_state_dict(engine.module)
    assert set(gathered) == set(ref_state), set(gathered) ^ set(ref_state)
    with torch.no_grad():  # evaluation through the pipeline = the updated reference model's loss
        ref_eval = sum(float(lm_loss(reference(t, **(carried[i] if documents else {})), l, m))
                       for i, (t, l, m) in enumerate(batches[:gas])) / gas
    eval_data = pipeline_data_iter(as_batches(gas))
    assert float(pipeline_eval_loss(engine, eval_data)) == pytest.approx(ref_eval, abs=1e-5)
    for name, tensor in ref_state.items():
        torch.testing.assert_close(gathered[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
    moved = max(float((ref_state[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # the step really changed the weights (the comparison is not of two untouched copies)


def _run(fn, *args):
    from parallel_spawn import run_distributed

    run_distributed(fn, 2, *args, timeout=180.0)


@pytest.mark.distributed
def test_pp2_full_attention_matches_no_pipeline_tied_zero1_clipping():
    # tied embedding on both stages: its gradient is summed across stages and counted once in the clipping norm
    _run(_pipeline_vs_reference, tiny_cfg(2), None, 2, 2, 3, "parameters", [0, 2, 5], 1, 0.5)


@pytest.mark.distributed
def test_pp2_sepllm_uneven_partition_untied_matches_no_pipeline():
    cfg = tiny_cfg(3, no_weight_tying=True)
    # 3 transformer layers on 2 stages: [embed, L0, L1 | L2, norm, head]
    _run(_pipeline_vs_reference, cfg, sep_cfg(3), 2, 2, 2, "uniform", [0, 3, 6])


@pytest.mark.distributed
def test_pp2_documents_sepllm_compact_matches_no_pipeline():
    # reset_position_ids + reset_attention_mask: position and document ids travel with the ids through both stages
    _run(_pipeline_vs_reference, tiny_cfg(2, no_weight_tying=True), sep_cfg(2), 2, 2, 2, "uniform", None, 1, 0.0, True)


@pytest.mark.distributed
def test_pp2_activation_checkpointing_sepllm_bipe_dense():
    # 3 layers, chunks of 2 pipeline layers: stage 0 = [embed, L0] [L1], stage 1 = [L2, norm] [tied head]
    cfg = tiny_cfg(3, pos_emb="learned", checkpoint_activations=True, checkpoint_num_layers=2)
    sep = sep_cfg(3, impl="dense", USE_BiPE=True)
    _run(_pipeline_vs_reference, cfg, sep, 2, 1, 3, "uniform", [0, 3, 6])


def _pp1_vs_pp0(rank: int, world: int) -> None:
    """Two data-parallel ranks: the pipeline engine with one stage vs the plain DeepSpeed engine, same weights."""
    import deepspeed

    from megatron.parallel.pipeline import (build_pipeline_model, gather_gpt_state_dict, load_gpt_state_dict,
                                            pipeline_data_iter, pipeline_train_step)
    from megatron.training.batches import Batch
    from megatron.training.engine import quiet_deepspeed_logs
    from megatron.training.optimizer import param_groups

    quiet_deepspeed_logs()
    cfg, sep = tiny_cfg(2), sep_cfg(2)
    micro, gas, steps = 2, 2, 2
    torch.manual_seed(0)
    model = GPTModel(cfg, sep)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rows = token_rows(micro * gas * steps * world, seed=3)
    mine = micro_batches(rows[rank::world], micro)  # this data-parallel rank's slice

    plain_opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR, eps=EPS)
    plain, _, _, _ = deepspeed.initialize(model=model, optimizer=plain_opt, config=ds_config(micro, gas, world),
                                          dist_init_required=False)
    it = iter(mine)
    plain_losses = []
    for _ in range(steps):
        total = torch.zeros(())
        for _ in range(gas):
            tokens, labels, mask = next(it)
            loss = lm_loss(plain(tokens), labels, mask)
            plain.backward(loss)
            plain.step()
            total += loss.detach()
        torch.distributed.all_reduce(total)
        plain_losses.append(float(total) / (gas * world))

    pipe = build_pipeline_model(cfg, sep, 1)
    assert list(pipe.parts) == [0, 5]
    load_gpt_state_dict(pipe, start)
    pipe_opt = torch.optim.AdamW(param_groups(pipe, 0.1), lr=LR, eps=EPS)
    engine, _, _, _ = deepspeed.initialize(model=pipe, optimizer=pipe_opt, config=ds_config(micro, gas, world),
                                           dist_init_required=False)
    data = pipeline_data_iter(Batch(tokens=t, labels=l, loss_mask=m) for t, l, m in mine)
    pipe_losses = [float(pipeline_train_step(engine, data)) for _ in range(steps)]
    assert pipe_losses == pytest.approx(plain_losses, abs=1e-6), (pipe_losses, plain_losses)
    gathered = gather_gpt_state_dict(engine.module)
    for name, tensor in plain.module.state_dict().items():
        torch.testing.assert_close(gathered[name], tensor, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.distributed
def test_pp1_equals_pp0_with_data_parallel_sepllm():
    _run(_pp1_vs_pp0)


# ------------------------------------------------------------------------------------------------ no processes


def _chain(cfg: ModelConfig, sep, model: GPTModel, tokens: torch.Tensor, carried: dict = None) -> torch.Tensor:
    """Run the stage modules by hand in one process (what the stages do across ranks); ``carried``: position /
    document ids the stages pass on with the token ids."""
    carried = carried or {}
    ctx = StageContext(cfg, sep, carries=tuple(carried))
    emb = EmbeddingPipe(ctx)
    layers = [TransformerLayerPipe(i, ctx) for i in range(cfg.num_layers)]
    norm = FinalNormPipe(cfg, ctx.carries)
    state = model.state_dict()
    for module in [emb, *layers, norm]:
        module.load_state_dict({local: state[module.to_gpt_name(local)] for local in module.state_dict()})
    x = emb((tokens, *carried.values()) if carried else tokens)
    for layer in layers:
        x = layer(x)
    return tied_head_forward(emb, norm(x))


def stage_variant(variant: str):
    """(model config, SepLLM config or None) of one named stage-test variant."""
    return {
        "full-rotary": lambda: (tiny_cfg(2), None),
        "full-learned": lambda: (tiny_cfg(2, pos_emb="learned"), None),
        "full-sinusoidal": lambda: (tiny_cfg(2, pos_emb="sinusoidal"), None),
        "full-learned-opt-offset": lambda: (tiny_cfg(2, pos_emb="learned", opt_pos_emb_offset=2,
                                                     max_position_embeddings=64), None),
        "sepllm-compact-rotary": lambda: (tiny_cfg(2), sep_cfg(2)),
        "sepllm-dense-bipe-learned": lambda: (tiny_cfg(2, pos_emb="learned"), sep_cfg(2, impl="dense", USE_BiPE=True)),
    }[variant]()


@pytest.mark.parametrize("variant", ["full-rotary", "sepllm-compact-rotary", "sepllm-dense-bipe-learned",
                                     "full-sinusoidal", "full-learned-opt-offset"])
def test_stage_modules_compose_to_gpt_model(variant):
    """The stages build from GPTModel's own ModelContext: the sinusoidal table and OPT's position offset (which an
    earlier stage embedding left out) included."""
    cfg, sep = stage_variant(variant)
    torch.manual_seed(1)
    model = GPTModel(cfg, sep)
    tokens = token_rows(2)[:, :-1]
    expected = model(tokens)
    got = _chain(cfg, sep, model, tokens)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    if sep is not None:  # the SepLLM mask really differs from causal here, so the check above covers the plan
        causal = GPTModel(cfg, None)
        causal.load_state_dict(model.state_dict())
        assert (causal(tokens) - expected).abs().max() > 1e-4


def document_batch(tokens: torch.Tensor) -> dict:
    """End-of-document tokens (id 0) at a few places; the restarted positions and document ids of the rows."""
    from megatron.data.documents import document_ids, document_positions

    tokens[0, [5, 6, 15]] = 0
    tokens[-1, 10] = 0
    docs = document_ids(tokens, 0)
    return {"position_ids": document_positions(docs), "document_ids": docs}


@pytest.mark.parametrize("variant", ["full-learned", "sepllm-compact-rotary", "sepllm-dense-bipe-learned"])
def test_stage_modules_carry_documents_like_gpt_model(variant):
    """reset_position_ids / reset_attention_mask: the stages carry the position and document ids and compute what
    GPTModel.forward(position_ids=, document_ids=) computes (and something else than without them)."""
    cfg, sep = stage_variant(variant)
    torch.manual_seed(1)
    model = GPTModel(cfg, sep)
    tokens = token_rows(2)[:, :-1].clone()
    carried = document_batch(tokens)
    expected = model(tokens, **carried)
    torch.testing.assert_close(_chain(cfg, sep, model, tokens, carried), expected, atol=1e-6, rtol=1e-6)
    for name in carried:              # each of the two alone, too
        only = {name: carried[name]}
        torch.testing.assert_close(_chain(cfg, sep, model, tokens, only), model(tokens, **only), atol=1e-6, rtol=1e-6)
    assert (model(tokens) - expected).abs().max() > 1e-4
    with pytest.raises(PipelineInputError, match=r"followed by \['position_ids', 'document_ids'\]"):
        EmbeddingPipe(StageContext(cfg, sep, carries=tuple(carried)))(tokens)


def test_stage_context_builds_plan_once_per_micro_batch():
    cfg, sep = tiny_cfg(2), sep_cfg(2)
    ctx = StageContext(cfg, sep)
    calls = []
    real = ctx.backend.prepare
    ctx.backend.prepare = lambda *a: calls.append(1) or real(*a)
    layers = [TransformerLayerPipe(i, ctx) for i in range(2)]
    tokens = token_rows(1)[:, :-1]
    x = (torch.randn(1, SEQ, 32), tokens)
    for layer in layers:
        x = layer(x)
    assert len(calls) == 1
    layers[0]((torch.randn(1, SEQ, 32), tokens.clone()))  # a new micro-batch: a new plan
    assert len(calls) == 2


def test_partition_method_names():
    assert _deepspeed_partition_method("uniform") == "type:TransformerLayerPipe"
    assert _deepspeed_partition_method("Parameters") == "parameters"
    with pytest.raises(PipelineConfigError, match="pipe_partition_method = 'balanced'"):
        _deepspeed_partition_method("balanced")


def test_build_rejects_impossible_pipelines_before_any_communication():
    from megatron.parallel.pipeline import build_pipeline_model

    with pytest.raises(PipelineConfigError, match="pipe_parallel_size 0 means no pipeline engine"):
        build_pipeline_model(tiny_cfg(2), None, 0)
    with pytest.raises(ConfigError, match="pipe_parallel_size = 4 needs at least one layer per stage, but num_lay"):
        build_pipeline_model(tiny_cfg(2), None, 4)
    with pytest.raises(PipelineConfigError, match="model_parallel_size = 2 with pipe_parallel_size = 2"):
        build_pipeline_model(tiny_cfg(2), None, 2, model_parallel_size=2)
    with pytest.raises(PipelineConfigError, match="pipe_partition_method = 'random'"):
        build_pipeline_model(tiny_cfg(2), None, 2, partition_method="random")
    with pytest.raises(ValueError, match="pos_emb"):  # GPTModel's own config checks run first
        build_pipeline_model(tiny_cfg(2, pos_emb="sinusoid"), None, 2)


def test_stage_inputs_are_checked():
    cfg = tiny_cfg(2)
    ctx = StageContext(cfg, None)
    with pytest.raises(PipelineInputError, match="integer input_ids"):
        EmbeddingPipe(ctx)(torch.randn(2, SEQ))
    with pytest.raises(PipelineInputError, match="transformer layer 0"):
        TransformerLayerPipe(0, ctx)(torch.randn(2, SEQ, 32))


def test_pipeline_loss_matches_lm_loss():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1.0, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    assert torch.equal(pipeline_lm_loss(logits, (labels, mask)), lm_loss(logits, labels, mask))
    assert torch.equal(pipeline_lm_loss(logits, labels), lm_loss(logits, labels))


def test_empty_stage_is_refused_on_every_rank():
    from types import SimpleNamespace

    from megatron.parallel.pipeline import _check_stage_has_layers

    _check_stage_has_layers(SimpleNamespace(parts=[0, 2, 5]), 2)  # [embed, L0] [L1, norm, head]
    with pytest.raises(PipelineConfigError, match=r"stage 1 received no transformer layer \(partition \[0, 3, 5\]\)"):
        _check_stage_has_layers(SimpleNamespace(parts=[0, 3, 5]), 2)  # [embed, L0, L1] [norm, head]
