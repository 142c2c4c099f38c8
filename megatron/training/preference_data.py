"""DPO's data for the loop: the pairwise datasets a config names, and loader samples -> :class:`PreferenceBatch`.

A loader sample holds ``pos`` / ``pos_label`` / ``neg`` / ``neg_label`` rows (``megatron.data.pairwise_dataset``);
each side becomes a :class:`~megatron.training.batches.Batch` by the same ``make_batch`` as language-model data
(labels shifted by one, -100 never counted, the config's ``eod_mask_loss`` / ``reset_*`` rules), and the step runs
one forward over their concatenation ``[chosen; rejected]``, as GPT-NeoX does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor

from megatron.config.preference import SPLITS, pair_keys
from megatron.training.batches import Batch, BatchRules, make_batch

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


@dataclass
class PreferenceBatch:
    """One micro-batch of pairs: the chosen and rejected sides, and the precomputed reference log-probabilities
    (``[B]`` each, summed over the counted tokens) when the data carries them."""

    chosen: Batch
    rejected: Batch
    reference: Optional[tuple[Tensor, Tensor]] = None
    _both: Optional[Batch] = field(default=None, init=False, repr=False)

    @property
    def both(self) -> Batch:
        """``[chosen; rejected]`` along the batch dimension (one forward for both sides)."""
        if self._both is None:
            def cat(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
                return None if a is None else torch.cat((a, b), dim=0)

            c, r = self.chosen, self.rejected
            self._both = Batch(tokens=cat(c.tokens, r.tokens), labels=cat(c.labels, r.labels),
                               loss_mask=cat(c.loss_mask, r.loss_mask), position_ids=cat(c.position_ids,
                                                                                        r.position_ids),
                               document_ids=cat(c.document_ids, r.document_ids))
        return self._both

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens


def make_preference_batch(sample: Mapping[str, Any], rules: BatchRules, device: torch.device | str
                          ) -> PreferenceBatch:
    """Loader sample -> batch; ``pos_ref`` / ``neg_ref`` (per-token reference log-probabilities aligned with the
    text, GPT-NeoX's precompute layout) are summed over each side's counted tokens."""
    sides = []
    for side in ("pos", "neg"):
        sides.append(make_batch({"text": sample[side], "label": sample.get(f"{side}_label")}, rules, device))
    chosen, rejected = sides
    reference = None
    if "pos_ref" in sample:
        reference = tuple(
            (torch.as_tensor(sample[f"{side}_ref"]).to(device=device, dtype=torch.float32)[:, :-1] * b.loss_mask
             ).sum(-1) for side, b in (("pos", chosen), ("neg", rejected)))
    return PreferenceBatch(chosen=chosen, rejected=rejected, reference=reference)


def build_preference_datasets(cfg: NeoXConfig, num_samples: list[int]) -> tuple[Any, Any, Any]:
    """The train / valid / test pairwise datasets of ``cfg`` (``num_samples`` per split; 0 or no paths: None)."""
    from megatron.data.pairwise_dataset import PairSource, build_pairwise_dataset

    d, t = cfg.data, cfg.training
    out = []
    for split, wanted in zip(SPLITS, num_samples):
        pos, neg, pos_label, neg_label = (getattr(d, key) or [] for key in pair_keys(split))
        if not pos or wanted <= 0:
            out.append(None)
            continue
        sources = [PairSource.open(p, n, pos_label[i] if pos_label else None, neg_label[i] if neg_label else None,
                                   reference_name=t.precompute_model_name)
                   for i, (p, n) in enumerate(zip(pos, neg))]
        out.append(build_pairwise_dataset(split, sources, wanted, cfg.model.seq_length, t.seed))
    return out[0], out[1], out[2]


__all__ = ["PreferenceBatch", "build_preference_datasets", "make_preference_batch"]
