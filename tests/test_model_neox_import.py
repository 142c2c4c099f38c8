"""Import of original GPT-NeoX checkpoints (Sequential and PipelineModule layouts) into GPTModel."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron.config.model import ModelConfig
from megatron.model import GPTModel
from megatron.checkpoint.neox_library import from_neox_state_dict, neox_pipeline_to_sequential

VOCAB = 64


def cfg(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, pos_emb="rotary",
                rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True, padded_vocab_size=VOCAB)
    base.update(kw)
    return ModelConfig(**base)


def neox_layers(model: GPTModel, c: ModelConfig) -> dict[int, dict[str, torch.Tensor]]:
    """What GPT-NeoX's PipelineModule would save for this architecture, one dict per module index."""
    sd = model.state_dict()
    layers: dict[int, dict[str, torch.Tensor]] = {0: {"word_embeddings.weight": sd["embed.word_embeddings.weight"]}}
    for i in range(c.num_layers):
        prefix = f"layers.{i}."
        layers[i + 2] = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        layers[i + 2]["attention.rotary_emb.inv_freq"] = torch.ones(2)  # buffer present in NeoX checkpoints
    layers[c.num_layers + 3] = {"norm.weight": sd["final_layernorm.weight"], "norm.bias": sd["final_layernorm.bias"]}
    if c.no_weight_tying:
        layers[c.num_layers + 4] = {"final_linear.weight": sd["output_layer.weight"]}
    return layers


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_and_sequential_layouts_load_exactly(tied: bool) -> None:
    c = cfg(no_weight_tying=not tied)
    torch.manual_seed(0)
    src = GPTModel(c).eval()
    seq_state = neox_pipeline_to_sequential(neox_layers(src, c))
    assert "sequential.2.attention.query_key_value.weight" in seq_state
    dst = GPTModel(c).eval()
    dst.load_state_dict(from_neox_state_dict({"module": seq_state}, c))
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(dst(ids), src(ids))


def test_smaller_checkpoint_vocab_is_padded() -> None:
    c = cfg()
    src = GPTModel(c)
    layers = neox_layers(src, c)
    layers[0]["word_embeddings.weight"] = layers[0]["word_embeddings.weight"][:50]
    layers[c.num_layers + 4]["final_linear.weight"] = layers[c.num_layers + 4]["final_linear.weight"][:50]
    out = from_neox_state_dict(neox_pipeline_to_sequential(layers), c)
    assert out["embed.word_embeddings.weight"].shape[0] == VOCAB
    assert torch.count_nonzero(out["embed.word_embeddings.weight"][50:]) == 0


def test_errors_name_the_problem() -> None:
    c = cfg()
    layers = neox_layers(GPTModel(c), c)
    broken = dict(layers)
    del broken[c.num_layers + 4]
    with pytest.raises(KeyError, match="final_linear"):
        from_neox_state_dict(neox_pipeline_to_sequential(broken), c)
    extra = neox_pipeline_to_sequential(layers)
    extra["sequential.9.something.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected"):
        from_neox_state_dict(extra, c)
    llama = neox_pipeline_to_sequential(layers)
    llama["sequential.2.mlp.w1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="Llama-style"):
        from_neox_state_dict(llama, c)
    with pytest.raises(KeyError, match=r"sequential\.4\.input_layernorm\.weight.*layer 2"):
        from_neox_state_dict(neox_pipeline_to_sequential(layers), dataclasses.replace(c, num_layers=3))
