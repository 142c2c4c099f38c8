"""Fused chunked output layer + cross-entropy (``model.fused_cross_entropy``): loss and every gradient equal the
plain path (``lm_loss`` over the logits) to fp32 rounding -- with ignored labels and a loss mask, any chunk size, tied
and untied heads, through the trainer's ``forward_loss``, and with the vocabulary split over 2 tensor-parallel ranks
(gloo, with and without sequence parallelism)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.config.model import ModelConfig
from megatron.model.fused_loss import FusedLMLoss, fused_lm_loss
from megatron.model.gpt import GPTModel
from megatron.model.loss import lm_loss
from megatron.training.batches import Batch
from megatron.training.steppers import forward_loss
from parallel_spawn import run_distributed

VOCAB = 64


def _inputs(seed: int = 0, b: int = 2, s: int = 9, h: int = 16, v: int = 50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, 2] = -100
    mask = torch.ones(b, s)
    mask[1, -3:] = 0.0
    return hidden, weight, labels, mask


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_loss_and_gradients_equal_plain_path(chunk):
    hidden, weight, labels, mask = _inputs()
    ref = lm_loss(F.linear(hidden, weight), labels, mask)
    ref_gh, ref_gw = torch.autograd.grad(ref * 3.0, (hidden, weight))
    loss = fused_lm_loss(hidden, weight, labels, mask, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(loss * 3.0, (hidden, weight))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, ref_gh, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw, atol=1e-7, rtol=1e-5)
    with torch.no_grad():   # evaluation: the loss alone
        torch.testing.assert_close(fused_lm_loss(hidden, weight, labels, mask, chunk_tokens=chunk), ref.detach())


def test_no_counted_token_gives_zero_and_bad_labels_fail():
    hidden, weight, labels, _ = _inputs()
    loss = fused_lm_loss(hidden, weight, labels, torch.zeros(labels.shape))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert float(hidden.grad.abs().max()) == 0.0
    with pytest.raises(ValueError, match="below the vocabulary size 50"):
        fused_lm_loss(hidden, weight, labels + 50)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        fused_lm_loss(hidden, weight, labels, chunk_tokens=0)


class _Engine:
    """What ``forward_loss`` calls: the model itself (DeepSpeed's engine forwards keyword arguments the same way)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("untied", [True, False])
def test_trainer_forward_loss_matches_plain_model(untied):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, padded_vocab_size=VOCAB,
                      pos_emb="rotary", no_weight_tying=untied)
    torch.manual_seed(0)
    ref = GPTModel(cfg)
    fused = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 17), generator=g)
    mask = torch.ones(2, 16)
    mask[0, :4] = 0
    batch = Batch(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=mask)
    ref_loss = forward_loss(_Engine(ref), batch)
    loss = forward_loss(_Engine(fused), batch, FusedLMLoss(chunk_tokens=5))
    ref_loss.backward()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fused_loss_key_is_validated_and_pipeline_falls_back_with_one_warning(caplog):
    from megatron.config import load_config
    from megatron.errors import UserInputError
    from megatron.training.parallel_setup import _fused_chunk

    base = {"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 16,
            "max-position-embeddings": 16, "train_micro_batch_size_per_gpu": 1, "fused_cross_entropy": True}
    with pytest.raises(UserInputError, match="fused_cross_entropy_chunk"):
        load_config(dict(base, fused_cross_entropy_chunk=0))
    cfg = load_config(base)
    assert _fused_chunk(cfg, pipeline=False) == 1024
    with caplog.at_level(logging.WARNING):
        assert _fused_chunk(cfg, pipeline=True) == 0
    assert [r.message for r in caplog.records if "fused_cross_entropy" in r.message][0].startswith(
        "fused_cross_entropy: the pipeline engine")


# ------------------------------------------------------------------------------------ vocabulary over 2 TP ranks
def _tp_cases(rank: int, world: int) -> None:
    from megatron.parallel.reshard import is_gated, shard_spec, shard_tensor
    from megatron.parallel.tensor_parallel import apply_tensor_parallel, fused_loss_for

    for sp, untied in ((False, True), (True, False)):
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                          padded_vocab_size=VOCAB, pos_emb="rotary", no_weight_tying=untied)
        torch.manual_seed(0)
        ref = GPTModel(cfg)
        tp = apply_tensor_parallel(copy.deepcopy(ref), dist.group.WORLD, sequence_parallel=sp)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, VOCAB, (2, 17), generator=g)
        labels = ids[:, 1:].clone()
        labels[1, 3] = -100
        mask = torch.ones(2, 16)
        mask[1, -4:] = 0
        batch = Batch(tokens=ids[:, :-1], labels=labels, loss_mask=mask)
        ref_loss = forward_loss(_Engine(ref), batch)
        ref_loss.backward()
        loss_fn = fused_loss_for(tp, chunk_tokens=6)
        assert loss_fn.shard is not None and loss_fn.shard.start == rank * VOCAB // 2
        loss = forward_loss(_Engine(tp), batch, loss_fn)
        loss.backward()
        label = f"sp={sp} untied={untied}"
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, msg=lambda m: f"{label} loss: {m}")
        grads = dict(ref.named_parameters())
        for name, p in tp.named_parameters():
            expect = grads[name].grad
            spec = shard_spec(name, is_gated(cfg))
            if spec is not None:
                expect = shard_tensor(expect, spec, rank, world, name)
            torch.testing.assert_close(p.grad, expect, atol=2e-6, rtol=1e-4, msg=lambda m: f"{label} {name}: {m}")


@pytest.mark.distributed
def test_tp2_vocab_split_fused_loss_matches_plain():
    run_distributed(_tp_cases, 2, timeout=120)
