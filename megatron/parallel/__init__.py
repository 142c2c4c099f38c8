"""Parallelism applied around the (distribution-free) model: rank layout / process groups, tensor (+ sequence)
parallelism, TP checkpoint resharding. Imports are lazy so that ``import megatron.parallel`` stays cheap.

Wiring tensor parallelism into a DeepSpeed training loop (every rank, in this order)::

    groups = build_parallel_groups(world_size, rank, tp=cfg.parallel.model_parallel_size,
                                   pp=cfg.parallel.pipe_parallel_size, device_type=device)
    check_tp_split(cfg.model, groups.tp_size, cfg.parallel.sequence_parallel)  # megatron.config.layout
    set_seed(seed)                                   # SAME seed on every rank: identical full init before sharding
    model = GPTModel(cfg.model, cfg.sepllm)
    model = apply_tensor_parallel(model, groups, sequence_parallel=cfg.parallel.sequence_parallel)
    optimizer = build_optimizer(model, ...)          # after sharding: it must see the shard parameters
    engine = deepspeed.initialize(model=model, optimizer=optimizer, mpu=groups.deepspeed_mpu(),
                                  config=ds_config_with_train_batch = micro x accum x groups.dp_size, ...)
    loss_fn = loss_fn_for(model)                     # vocab-parallel cross-entropy; lm_loss for a plain model
    loader = build_loader(..., rank=groups.dp_rank, world_size=groups.dp_size)  # TP ranks read the SAME samples
    loss = loss_fn(engine(tokens), labels, loss_mask); engine.backward(loss); engine.step()

Where the loop measures/clips the gradient norm itself, use ``tp_grad_norm`` / ``clip_tp_grad_norm_``. Checkpoints:
the rank with ``dp_rank == 0`` of each TP rank saves ``engine.module.state_dict()`` as
``tp_model_file(groups.tp_rank, groups.tp_size)``; ``tools/ckpts/reshard_tp.py`` converts between TP sizes.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "mesh": ("ParallelGroups", "ParallelLayoutError", "RankLayout", "DeepSpeedMPU", "build_parallel_groups",
             "rank_layout"),
    "tensor_parallel": ("apply_tensor_parallel", "vocab_parallel_lm_loss", "loss_fn_for",
                        "gather_logits", "tp_grad_norm", "clip_tp_grad_norm_", "TensorParallelError"),
    "reshard": ("merge_tp_state_dicts", "split_tp_state_dict", "reshard_checkpoint", "tp_model_file", "ReshardError"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
