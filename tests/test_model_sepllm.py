"""GPTModel wired to the SepLLM backend through the attention interface."""

from __future__ import annotations

import dataclasses

import torch

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.model import GPTModel, lm_loss
from megatron.sepllm.attention.rules import allowed_mask, global_key_bitmap

VOCAB, SEP = 64, 7
LAYERS = 2


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, seq_length=64, pos_emb="rotary",
                rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, padded_vocab_size=VOCAB)
    base.update(kw)
    return ModelConfig(**base)


def make_sepllm_cfg(window: int, **kw) -> SepLLMConfig:
    """SepLLMConfig with the derived fields the config validation would fill in."""
    base = dict(separator_token_ids=[SEP], init_tok_max_idx=1, prefill_local_window_size=window,
                generate_local_window_size=window, mode="sepllm", sep_attention_impl="dense",
                prefill_windows=[window] * LAYERS, generate_windows=[window] * LAYERS)
    base.update(kw)
    return SepLLMConfig(**base)


def ids_with_separators(batch: int = 2, seq: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(8, VOCAB, (batch, seq), generator=g)
    ids[:, 5::6] = SEP
    return ids


def test_window_covering_sequence_equals_causal_model() -> None:
    torch.manual_seed(0)
    causal = GPTModel(tiny()).eval()
    sep = GPTModel(tiny(), make_sepllm_cfg(window=64)).eval()
    sep.load_state_dict(causal.state_dict())
    ids = ids_with_separators()
    with torch.no_grad():
        torch.testing.assert_close(sep(ids), causal(ids), atol=1e-5, rtol=0)


def test_sepllm_model_matches_explicit_masked_reference() -> None:
    """The model's SepLLM output equals the causal model whose backend is swapped for the rule's dense mask."""
    torch.manual_seed(0)
    window = 3
    sep = GPTModel(tiny(), make_sepllm_cfg(window=window)).eval()
    ref = GPTModel(tiny()).eval()
    ref.load_state_dict(sep.state_dict())
    ids = ids_with_separators()
    allowed = allowed_mask(global_key_bitmap(ids, [SEP], num_initial=2), window).unsqueeze(1)
    base = ref.attention_backend

    class MaskedBackend:
        def prepare(self, input_ids, position_ids, attention_mask_2d):
            state = base.prepare(input_ids, position_ids, attention_mask_2d)
            state.allowed = allowed
            return state

        def __call__(self, *args, **kwargs):
            return base(*args, **kwargs)

    ref.attention_backend = MaskedBackend()
    with torch.no_grad():
        got, want = sep(ids), ref(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    full = GPTModel(tiny()).eval()
    full.load_state_dict(sep.state_dict())
    with torch.no_grad():
        assert not torch.allclose(got[:, 10:], full(ids)[:, 10:], atol=1e-4)  # the pattern really drops keys


def test_activation_checkpointing_with_sepllm_backend() -> None:
    cfg = tiny(num_layers=LAYERS)
    torch.manual_seed(0)
    plain = GPTModel(cfg, make_sepllm_cfg(window=4))
    ckpt = GPTModel(dataclasses.replace(cfg, checkpoint_activations=True), make_sepllm_cfg(window=4))
    ckpt.load_state_dict(plain.state_dict())
    ids = ids_with_separators()
    grads = []
    for model in (plain, ckpt):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the backend counted one prepare per forward in each model
    assert plain.attention_backend.retention.as_dict()["forward_calls"] == 1


def test_bipe_with_sepllm_runs_and_trains() -> None:
    torch.manual_seed(0)
    model = GPTModel(tiny(), make_sepllm_cfg(window=4, USE_BiPE=True, BiPE_seps=[SEP]))
    ids = ids_with_separators()
    loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert model.embed.position_embeddings.weight.grad is not None
