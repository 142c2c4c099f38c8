"""Parallelism applied around the (distribution-free) model: rank layout / process groups, tensor (+ sequence)
parallelism, TP checkpoint resharding. Imports are lazy so that ``import megatron.parallel`` stays cheap.

Wiring tensor parallelism into a DeepSpeed training loop (every rank, in this order)::

    groups = build_parallel_groups(world_size, rank, tp=cfg.parallel.model_parallel_size,
                                   pp=cfg.parallel.pipe_parallel_size, device_type=device)
    check_tp_compatible(cfg.model, groups.tp_size, cfg.parallel.sequence_parallel)   # also usable at config time
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

_EXPORTS = {
    "ParallelGroups": "megatron.parallel.mesh",
    "ParallelLayoutError": "megatron.parallel.mesh",
    "RankLayout": "megatron.parallel.mesh",
    "DeepSpeedMPU": "megatron.parallel.mesh",
    "build_parallel_groups": "megatron.parallel.mesh",
    "rank_layout": "megatron.parallel.mesh",
    "pipeline_stages": "megatron.parallel.mesh",
    "apply_tensor_parallel": "megatron.parallel.tensor_parallel",
    "check_tp_compatible": "megatron.parallel.tensor_parallel",
    "vocab_parallel_lm_loss": "megatron.parallel.tensor_parallel",
    "loss_fn_for": "megatron.parallel.tensor_parallel",
    "gather_logits": "megatron.parallel.tensor_parallel",
    "tp_grad_norm": "megatron.parallel.tensor_parallel",
    "clip_tp_grad_norm_": "megatron.parallel.tensor_parallel",
    "TensorParallelError": "megatron.parallel.tensor_parallel",
    "merge_tp_state_dicts": "megatron.parallel.reshard",
    "split_tp_state_dict": "megatron.parallel.reshard",
    "reshard_checkpoint": "megatron.parallel.reshard",
    "tp_model_file": "megatron.parallel.reshard",
    "ReshardError": "megatron.parallel.reshard",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
