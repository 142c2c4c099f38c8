"""GPT model (GPT-NeoX / Pythia / Llama-style) and its parts. Model code knows nothing about distribution."""

from megatron.model.attention_backend import AttentionBackend, CausalSDPABackend, build_attention_backend
from megatron.model.flops import flops_per_token
from megatron.model.gpt import GPTModel
from megatron.model.loss import lm_loss

__all__ = ["AttentionBackend", "CausalSDPABackend", "GPTModel", "build_attention_backend", "flops_per_token",
           "lm_loss"]
