"""``eval.py``'s body: process group (when launched on several ranks), the run, and one clear line per failure."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


def run_eval_cli(cfg: NeoXConfig, config_files: Sequence[str], overrides: Sequence[str]) -> int:
    """Run :func:`megatron.evaluation.runner.run_evaluation` on this rank; returns the exit status."""
    from megatron.errors import NeoxError, report_error
    from megatron.evaluation.lm import DataParallel
    from megatron.evaluation.runner import run_evaluation

    dp = DataParallel()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from megatron.device import resolve_device
        from megatron.training.distributed import init_distributed

        device = resolve_device(cfg.training.device, key="device")
        info = init_distributed(device, cfg.parallel.distributed_backend, deepspeed_comm=False)
        dp = DataParallel(rank=info.rank, world_size=info.world_size)
    try:
        run_evaluation(cfg, config_files=config_files, overrides=overrides, dp=dp)
    except NeoxError as exc:
        return report_error(exc)
    except (RuntimeError, OSError) as exc:
        print(f"error: evaluation failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if dp.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0
