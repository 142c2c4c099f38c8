"""The DPO loss (Rafailov et al. 2023) as pure tensor functions: sequence log-probabilities and the pairwise loss.

GPT-NeoX's formula (``train_impl: dpo``): with pi / ref the summed log-probabilities of the counted tokens of a
sequence under the trained / reference model,

    loss = mean over pairs of -logsigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

and the implicit rewards ``beta * (pi - ref)`` of each side, their margin and how often chosen beats rejected are the
metrics GPT-NeoX logs (``chosen_rewards``, ``rejected_rewards``, ``margins``, ``reward_acc``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor, fp32: bool = True) -> Tensor:
    """``[B, S]`` log-probability of each label under ``logits`` ``[B, S, V]`` (negative labels read id 0; mask
    them). ``fp32`` upcasts the logits first (GPT-NeoX's ``dpo_fp32``)."""
    if fp32:
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.gather(logp, dim=-1, index=labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def sequence_logps(per_token: Tensor, loss_mask: Tensor) -> Tensor:
    """``[B]`` summed log-probability of the counted tokens (``loss_mask`` 1) of each sequence, from the per-token
    log-probabilities (:func:`token_logps`, or its vocabulary-parallel form under tensor parallelism)."""
    return (per_token * loss_mask.to(per_token.dtype)).sum(-1)


@dataclass
class DPOResult:
    loss: Tensor                  # scalar, differentiable through pi_chosen / pi_rejected
    metrics: dict[str, Tensor]    # detached scalars (GPT-NeoX's names)


def dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> DPOResult:
    """The DPO loss of a batch of pairs (``[B]`` sequence log-probabilities each) and its metrics.

    A reference-free run passes zeros as the reference. The metrics: ``chosen_rewards`` / ``rejected_rewards`` (mean
    of beta x (pi - ref)), ``margins`` (their mean difference), ``reward_acc`` (fraction of pairs whose chosen reward
    is higher), ``chosen_pos`` / ``chosen_neg`` (mean pi of the chosen / rejected side; GPT-NeoX's names) and
    ``ref_pos`` / ``ref_neg`` (the same for the reference).
    """
    logits = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    with torch.no_grad():
        chosen_rewards = beta * (pi_chosen - ref_chosen).detach().float()
        rejected_rewards = beta * (pi_rejected - ref_rejected).detach().float()
        metrics = {
            "chosen_rewards": chosen_rewards.mean(),
            "rejected_rewards": rejected_rewards.mean(),
            "margins": (chosen_rewards - rejected_rewards).mean(),
            "reward_acc": (chosen_rewards > rejected_rewards).float().mean(),
            "chosen_pos": pi_chosen.detach().float().mean(),
            "chosen_neg": pi_rejected.detach().float().mean(),
            "ref_pos": ref_chosen.detach().float().mean(),
            "ref_neg": ref_rejected.detach().float().mean(),
        }
    return DPOResult(loss=loss, metrics=metrics)


__all__ = ["DPOResult", "dpo_loss", "sequence_logps", "token_logps"]
