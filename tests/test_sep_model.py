"""Model level: a tiny SepLLM GPT trains to the same losses with the compact path as with the dense path."""

from __future__ import annotations

import pytest
import torch

from megatron.config.model import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.model.loss import lm_loss
from megatron.sepllm.attention.backend import SepLLMBackend

from sep_helpers import PYTHIA_SEPS, make_sepllm_cfg, pg19_ids

VOCAB = 1024


def _train_losses(impl: str, ids: torch.Tensor, steps: int = 20) -> list[float]:
    torch.manual_seed(1234)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=ids.shape[1] - 1,
                      pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True,
                      padded_vocab_size=VOCAB)
    sep_cfg = make_sepllm_cfg(num_layers=2, prefill_windows=[16, 48], sep_attention_impl=impl)
    model = GPTModel(cfg, sep_cfg)
    assert isinstance(model.attention_backend, SepLLMBackend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        batch = ids[step % ids.shape[0]: step % ids.shape[0] + 2]
        logits = model(batch[:, :-1])
        loss = lm_loss(logits, batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert model.attention_backend.retention.forward_calls == steps
    return losses


@pytest.mark.slow
def test_compact_trains_like_dense(pg19_dir, neox_tokenizer_file):
    tokens = pg19_ids(pg19_dir, neox_tokenizer_file, 4 * 129, book_index=2)
    # keep the real separator positions, fold the other ids into a small vocabulary so the test stays fast
    seps = torch.isin(tokens, torch.tensor(PYTHIA_SEPS))
    ids = torch.where(seps, tokens, 300 + tokens % 700).view(4, 129)
    assert torch.isin(ids, torch.tensor(PYTHIA_SEPS)).any()
    dense = _train_losses("dense", ids)
    compact = _train_losses("compact", ids)
    assert dense[-1] < dense[0] - 0.5  # it actually learns
    assert compact == pytest.approx(dense, abs=1e-4)
