"""Selective activation checkpointing (torchtitan's ``op`` and every-N-th-layer modes beside the full mode): loss and
every gradient equal those without checkpointing, dropout included; bad values fail in one line naming the key."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron.config.model import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.model.loss import lm_loss

VOCAB = 64


def _loss_and_grads(model: GPTModel, ids: torch.Tensor):
    torch.manual_seed(7)
    loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,option", [("full", "op"), ("selective", "op"), ("selective", "2")])
def test_checkpointed_step_equals_plain(mode, option):
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16, padded_vocab_size=VOCAB,
                      pos_emb="rotary", hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    plain = GPTModel(cfg)
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.checkpoint_activations = True
    ckpt.cfg.activation_checkpoint_mode = mode
    ckpt.cfg.selective_ac_option = option
    assert not plain.cfg.checkpoint_activations
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(ckpt, ids)
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("key,value,needle", [("activation_checkpoint_mode", "some", "full or selective"),
                                              ("selective_ac_option", "ops", "op or a layer interval"),
                                              ("selective_ac_option", "0", "op or a layer interval"),
                                              ("selective_ac_option", 2, "a string")])
def test_bad_values_name_the_key(key, value, needle):
    from megatron.config import load_config
    from megatron.errors import UserInputError

    with pytest.raises(UserInputError, match=f"{key}.*{needle}"):
        load_config({"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 16,
                     "max-position-embeddings": 16, "train_micro_batch_size_per_gpu": 1, key: value})
    assert load_config({"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 16,
                        "max-position-embeddings": 16, "train_micro_batch_size_per_gpu": 1,
                        "selective_ac_option": "2"}).model.selective_ac_option == "2"
