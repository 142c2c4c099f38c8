"""The DPO step (``train_impl: dpo``): the plain stepper with DPO's forward, batches, metrics and reference model.

:func:`use_dpo` turns a :class:`~megatron.training.steppers.PlainStepper` into a DPO stepper: its micro-batches are
:class:`~megatron.training.preference_data.PreferenceBatch` objects, its forward is :class:`DPOForward` (one
forward of the trained model over ``[chosen; rejected]``, summed log-probabilities of the counted tokens, the loss
of ``megatron.model.preference_loss``), so gradient accumulation, clipping, the grad norm and ZeRO stay the plain
engine's. Validation runs the same forward: the valid loss is the DPO loss on valid pairs.

The reference log-probabilities come from one of three places (GPT-NeoX's options):

* a frozen reference model (default): a copy of the weights the run starts from, i.e. the model ``load`` gives
  (or the initial weights without ``load``), set up by :func:`set_up_reference` once the checkpoint is loaded. A run
  that starts at iteration 0 with ``save`` writes the reference weights to ``<save>/dpo_reference.pt`` (under tensor
  parallelism one ``dpo_reference_tpNN.pt`` per TP rank); a resumed run reads them from ``load``, so resuming does
  not turn the reference into the resumed policy.
* ``precompute_model_name``: per-token reference log-probabilities stored beside the data (``pos_ref`` /
  ``neg_ref`` rows of the pairwise dataset), summed over the counted tokens.
* ``dpo_reference_free``: no reference (zeros).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.atomic_io import atomic_open
from megatron.model.preference_loss import dpo_loss, sequence_logps, token_logps
from megatron.parallel.tensor_parallel import vocab_parallel_cross_entropy
from megatron.training.distributed import DistInfo, barrier
from megatron.training.preference_data import PreferenceBatch, make_preference_batch
from megatron.training.steppers import PlainStepper, TrainingError, batch_inputs

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig
    from megatron.training.run import Run

#: where a DPO run keeps the weights of its reference model (in ``save``; read back from ``load`` on resume)
REFERENCE_FILE = "dpo_reference.pt"
#: the metrics of a DPO step, in the order they are reduced over ranks (GPT-NeoX's names)
METRIC_KEYS = ("chosen_rewards", "rejected_rewards", "margins", "reward_acc", "chosen_pos", "chosen_neg",
               "ref_pos", "ref_neg")


@dataclass
class DPOForward:
    """``(engine, PreferenceBatch, loss_fn) -> DPO loss``, the plain stepper's ``forward`` under DPO.

    Forwards add their metrics to running sums, training forwards (grad enabled) and validation forwards (no grad)
    apart, which :meth:`drain` averages over the forwards since its last call and the data-parallel ranks.
    """

    beta: float
    fp32: bool
    reference_free: bool
    precomputed: bool
    info: DistInfo
    reference: Optional[torch.nn.Module] = None
    # (logits, labels) -> [B, S] label log-probabilities; a tensor-parallel model's logits are vocabulary-sharded
    per_token: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    _sums: dict[str, dict[str, Tensor]] = field(default_factory=lambda: {"train": {}, "eval": {}}, repr=False)
    _counts: dict[str, int] = field(default_factory=lambda: {"train": 0, "eval": 0}, repr=False)

    @property
    def needs_reference_model(self) -> bool:
        return not (self.reference_free or self.precomputed)

    def __call__(self, engine: Any, batch: PreferenceBatch, loss_fn: Optional[Callable[..., Tensor]] = None
                 ) -> Tensor:
        both = batch.both
        logits = engine(both.tokens, **batch_inputs(both))
        pi_chosen, pi_rejected = self._sequence_logps(logits, both).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch, pi_chosen)
        result = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, self.beta)
        kind = "train" if torch.is_grad_enabled() else "eval"
        sums = self._sums[kind]
        for key in METRIC_KEYS:
            value = result.metrics[key].detach()
            sums[key] = sums[key] + value if key in sums else value
        self._counts[kind] += 1
        return result.loss

    @torch.no_grad()
    def reference_logps(self, batch: PreferenceBatch, like: Tensor) -> tuple[Tensor, Tensor]:
        """``[B]`` reference log-probabilities of the chosen and rejected sides."""
        if self.reference_free:
            zeros = torch.zeros_like(like, dtype=torch.float32)
            return zeros, zeros
        if self.precomputed:
            if batch.reference is None:
                raise TrainingError("precompute_model_name is set but the batch has no pos_ref / neg_ref rows")
            return batch.reference
        if self.reference is None:
            raise TrainingError("the DPO reference model is not set up (megatron.training.dpo.set_up_reference)")
        both = batch.both
        logits = self.reference(both.tokens, **batch_inputs(both))
        ref_chosen, ref_rejected = self._sequence_logps(logits, both).chunk(2)
        return ref_chosen, ref_rejected

    def _sequence_logps(self, logits: Tensor, both: Any) -> Tensor:
        per_token = (self.per_token or functools.partial(token_logps, fp32=self.fp32))(logits, both.labels)
        return sequence_logps(per_token, both.loss_mask)

    def drain(self, kind: str = "train") -> dict[str, float]:
        """The mean metrics of the ``kind`` ("train" / "eval") forwards since the last call, averaged over ranks
        (collective: every rank ran the same number of forwards); resets them."""
        count, sums = self._counts[kind], self._sums[kind]
        if not count:
            return {}
        values = torch.stack([sums[k].float() for k in METRIC_KEYS]) / count
        if self.info.world_size > 1:
            dist.all_reduce(values)
            values /= self.info.world_size
        self._sums[kind], self._counts[kind] = {}, 0
        return dict(zip(METRIC_KEYS, values.tolist()))


def use_dpo(stepper: PlainStepper, cfg: NeoXConfig, info: DistInfo) -> DPOForward:
    """Give ``stepper`` DPO's forward, batches and metrics (the reference model follows in set_up_reference)."""
    if not isinstance(stepper, PlainStepper):
        raise TrainingError("train_impl dpo runs on the plain engine only (pipe_parallel_size 0 or 1)")
    t = cfg.training
    forward = DPOForward(beta=float(t.dpo_beta), fp32=bool(t.dpo_fp32), reference_free=bool(t.dpo_reference_free),
                         precomputed=bool(t.precompute_model_name), info=info,
                         per_token=_vocab_parallel_logps(stepper.engine.module, bool(t.dpo_fp32)))
    stepper.forward, stepper.batch_of, stepper.metrics = forward, make_preference_batch, forward.drain
    return forward


def _vocab_parallel_logps(module: torch.nn.Module, fp32: bool) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """Label log-probabilities from a tensor-parallel model's vocabulary-sharded logits (None for a plain model):
    minus the exact vocabulary-parallel cross-entropy, identical on every rank of the TP group."""
    tp = getattr(module, "tensor_parallel", None)
    if tp is None or tp.size == 1:
        return None
    return lambda logits, labels: -vocab_parallel_cross_entropy(logits, labels.clamp_min(0), tp.group, upcast=fp32)


def reference_file(module: torch.nn.Module) -> str:
    """The reference weights' file name: one per tensor-parallel rank (each holds its shards)."""
    tp = getattr(module, "tensor_parallel", None)
    return REFERENCE_FILE if tp is None or tp.size == 1 else f"dpo_reference_tp{tp.rank:02d}.pt"


def set_up_reference(run: Run) -> None:
    """Freeze the reference model once ``load`` is in the engine (see the module docstring); a no-op without one."""
    forward = getattr(run.stepper, "forward", None)   # the pipeline engine's stepper has none (no DPO there)
    if not isinstance(forward, DPOForward) or not forward.needs_reference_model:
        return
    ck = run.config.checkpoint
    reference = copy.deepcopy(run.engine.module)  # no RNG drawn: a resumed run's dropout stream stays the same
    name = reference_file(reference)
    saved = Path(ck.load) / name if ck.load else None
    if run.state.iteration > 0 and saved is not None and saved.is_file():
        reference.load_state_dict(torch.load(saved, map_location=run.device, weights_only=True))
        note = f"DPO reference model: {saved} (the weights this DPO run started from)"
    elif run.state.iteration > 0:
        note = (f"warning: DPO reference model: no {name} in {ck.load}: the reference is the resumed "
                f"checkpoint's weights (GPT-NeoX's behaviour), not the weights the DPO run started from")
    else:
        start = f"loaded from {ck.load}" if ck.load else "the initial weights"
        note = f"DPO reference model: a frozen copy of the starting weights ({start})"
        if ck.save:
            if run.plan.dp_rank == 0:  # one writer per tensor-parallel rank
                path = Path(ck.save) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(path, "wb", encoding=None) as handle:
                    torch.save(reference.state_dict(), handle)
            barrier()
            note += f", saved to {Path(ck.save) / name} for resumes"
    reference.eval()
    reference.requires_grad_(False)
    forward.reference = reference
    run.logger.info(note)


__all__ = ["DPOForward", "METRIC_KEYS", "REFERENCE_FILE", "reference_file", "set_up_reference", "use_dpo"]
