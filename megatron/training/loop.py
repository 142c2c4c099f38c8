"""The pretraining loop: build everything from a resolved config, train, evaluate, checkpoint, log.

Order inside an iteration ``it`` (1-indexed): set the LR for ``it`` -> ``gradient_accumulation_steps`` micro-batches
(forward, ``engine.backward``, ``engine.step``; DeepSpeed applies the optimizer at the accumulation boundary) -> log
-> save (``checkpoint_factor`` / ``extra_save_iters``) -> validate (``eval_interval``). A checkpoint taken after
iteration ``k`` holds everything iteration ``k + 1`` depends on (weights, optimizer, RNG, consumed samples), so a
resumed run reproduces the uninterrupted one bit for bit on the same hardware and world size.

Parallelism (see :mod:`megatron.training.parallel_setup`): ranks are laid out ``(pipe, data, model)``; data loaders
are sliced by DATA-parallel rank; ``model-parallel-size > 1`` shards the model with ``apply_tensor_parallel`` and
gives DeepSpeed the mpu; ``pipe-parallel-size >= 2`` replaces the micro-batch loop by DeepSpeed's pipeline engine
(``engine.train_batch``). ``pipe-parallel-size`` 0 and 1 both run the plain engine (numerically identical to a
one-stage pipeline, and without the pipeline engine's ZeRO <= 1 restriction).
"""

from __future__ import annotations

import copy
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron.model.loss import lm_loss
from megatron.training.batches import Batch, make_batch
from megatron.training.checkpointing import (CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint,
                                             should_save)
from megatron.config.errors import ConfigError
from megatron.config.training_checks import decay_iters
from megatron.training.data_setup import (DataSetupError, build_datasets, build_epoch_datasets, build_loader,
                                          check_token_ids, ensure_data)
from megatron.training.distributed import DistInfo, barrier, init_distributed, set_seed
from megatron.training.engine import check_device_support, quiet_deepspeed_logs, resolve_device
from megatron.training.flops import default_peak_flops, flops_per_token, mfu
from megatron.training.interrupt import StopRequest, TrainingInterrupted
from megatron.training.logging import RunLogger, format_console_line
from megatron.training.diagnostics import StepDiagnostics
from megatron.training.lr_schedules import AnnealingLR, resolve_warmup_iters
from megatron.training.parallel_setup import ParallelPlan, plan_parallel
from megatron.training.preflight import check_output_dirs
from megatron.training.profiling import StepProfiler
from megatron.training.size_summary import summarize, summary_lines
from megatron.training.steppers import PlainStepper, Stepper, build_stepper
from megatron.errors import RunError


class TrainingError(RunError, RuntimeError):
    """The run cannot start or continue (with a message that says why)."""


@dataclass
class TrainResult:
    """What a finished run reports back (used by tests, benchmarks and train.py's summary)."""

    iteration: int
    train_losses: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    test_loss: float | None = None
    checkpoints: list[str] = field(default_factory=list)
    log_dir: str | None = None
    tokens_per_sec: float | None = None
    wall_time_s: float = 0.0


@dataclass
class RunState:
    """Where the run is: read by the step hooks, the log, checkpoints and the stop handler."""

    iteration: int
    consumed: int
    start_iteration: int
    last_saved: int | None = None
    forward_calls: int = 0


@dataclass
class _Interval:
    """Running sums between two log lines."""

    loss_sum: float = 0.0
    iters: int = 0
    tokens: int = 0
    time_s: float = 0.0

    def reset(self) -> None:
        self.loss_sum, self.iters, self.tokens, self.time_s = 0.0, 0, 0, 0.0


# ----------------------------------------------------------------------------------------------------------------
# steps


def forward_loss(engine: Any, batch: Batch, loss_fn: Any = lm_loss) -> torch.Tensor:
    """``loss_fn`` is ``lm_loss`` or, for a tensor-parallel model, the vocab-parallel loss over its TP group."""
    logits = engine(batch.tokens)
    return loss_fn(logits, batch.labels, batch.loss_mask)


def _mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    if info.world_size > 1:
        value = value.detach().clone().float()
        dist.all_reduce(value)
        value /= info.world_size
    return float(value)


def train_step(engine: Any, batches: Iterator[Batch], gas: int, own_grad_norm: bool,
               on_forward: Any = None, clip: float = 0.0,
               loss_fn: Any = lm_loss, on_boundary: Any = None) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``gas`` micro-batches; returns (mean local loss, global grad norm).

    ``on_boundary(engine)`` runs once the step's gradients are final (reduced), before clipping and the update
    (the per-parameter diagnostics read them there).

    ``own_grad_norm`` (ZeRO-0 fp32, where DeepSpeed does not report the norm): we measure the norm at the
    accumulation boundary and clip to ``clip`` ourselves in the same pass (DeepSpeed's clipping is then off). The
    squares are summed in fp64 like DeepSpeed's ZeRO norm: an fp32 sum over the millions of entries of a CPU
    embedding gradient is off by ~1e-4 relative, which changed the clipping and made ZeRO-0 and ZeRO-1..3 diverge.
    """
    from megatron.parallel.tensor_parallel import clip_tp_grad_norm_, tp_grad_norm

    losses = []
    norm = None
    for _ in range(gas):
        batch = next(batches)
        loss = forward_loss(engine, batch, loss_fn)
        if on_forward is not None:
            on_forward()
        engine.backward(loss)
        if on_boundary is not None and engine.is_gradient_accumulation_boundary():
            on_boundary(engine)
        if own_grad_norm and engine.is_gradient_accumulation_boundary():
            # grads are final (all-reduced) at the boundary; one pass gives the norm and clips (a plain model is a
            # tensor-parallel model of size 1 for these two)
            norm = clip_tp_grad_norm_(engine.module, clip) if clip > 0 else float(tp_grad_norm(engine.module))
        engine.step()
        losses.append(loss.detach().float())
    ds_norm = engine.get_global_grad_norm()
    if ds_norm is not None:
        norm = float(ds_norm)
    return torch.stack(losses).mean(), norm


@torch.no_grad()
def evaluate(stepper: Stepper, dataset: Any, num_batches: int, micro_batch: int, plan: ParallelPlan,
             eod: int | None, eod_mask_loss: bool, device: str) -> float | None:
    """Mean LM loss over the first ``num_batches`` micro-batches per data-parallel rank of ``dataset`` (None when
    empty)."""
    loader = build_loader(dataset, 0, micro_batch, plan.dp_rank, plan.dp_size, num_workers=0, pin_memory=False)
    if loader is None:
        return None
    batches = (make_batch(sample, eod, eod_mask_loss, device) for sample in loader)
    return stepper.eval_loss(batches, min(num_batches, len(loader.batch_sampler)))


def _memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------
# set-up


def _build_tokenizer_and_vocab(cfg: Any) -> Any:
    from megatron.config import check_separator_ids, padded_vocab_size
    from megatron.tokenizer import build_tokenizer

    tok = cfg.tokenizer
    tokenizer = build_tokenizer(tok.tokenizer_type, tok.vocab_file, tok.merge_file)
    if cfg.model.padded_vocab_size is None:
        cfg.model.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by,
                                                        cfg.parallel.model_parallel_size)
    elif cfg.model.padded_vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{cfg.source_of('model.padded_vocab_size')}: padded_vocab_size "
                          f"{cfg.model.padded_vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size})")
    check_separator_ids(cfg.sepllm, tokenizer.vocab_size)
    return tokenizer


def _check_supported(cfg: Any) -> None:
    t = cfg.training
    if getattr(t, "train_epochs", None) is None and (t.train_iters is None or t.train_iters < 0):
        raise ConfigError(f"train_iters (or train_epochs) must be set to a number >= 0, got {t.train_iters!r}")


def _check_checkpoint_space(cfg: Any, n_params: int, info: DistInfo, logger: RunLogger) -> None:
    """Rank 0 measures, every rank gets the verdict (so all fail together, before any collective of training)."""
    from megatron.training.distributed import broadcast_object
    from megatron.training.preflight import OutputPathError, check_checkpoint_space, checkpoint_bytes

    verdict: tuple[str, str] | None = None
    if info.rank == 0:
        t = cfg.training
        sizes = checkpoint_bytes(n_params, t.precision, int(t.zero_stage), str(cfg.optimizer.type or "adamw"),
                                 float(getattr(cfg.optimizer, "momentum", 0.0) or 0.0),
                                 save_optim=not cfg.checkpoint.no_save_optim)
        try:
            warning = check_checkpoint_space(cfg.checkpoint.save, *sizes)
            verdict = ("warning", warning) if warning else None
        except OutputPathError as exc:
            verdict = ("error", str(exc))
    verdict = broadcast_object(verdict)
    if verdict is None:
        return
    if verdict[0] == "error":
        raise OutputPathError(verdict[1])
    logger.info(f"warning: {verdict[1]}")


def _make_scheduler(cfg: Any, train_iters: int) -> AnnealingLR:
    """GPT-NeoX's schedule for a run of ``train_iters`` steps (lr_decay_iters / warmup_iters derived here when
    validation could not: configs built in code, train_epochs)."""
    ls = cfg.lr_schedule
    decay = ls.lr_decay_iters or decay_iters(train_iters, None, getattr(ls, "lr_decay_fraction", None))
    warmup = ls.warmup_iters if ls.warmup_iters is not None else resolve_warmup_iters(ls.warmup, decay)
    scheduler = AnnealingLR(max_lr=float(cfg.optimizer.lr), warmup_iters=float(warmup), lr_decay_iters=int(decay),
                            decay_style=ls.lr_decay_style, min_lr=float(ls.min_lr),
                            wsd_decay_fraction=float(getattr(ls, "wsd_decay_fraction", 0.1)),
                            wsd_decay_style=getattr(ls, "wsd_decay_style", "linear"))
    scheduler.check_reach(train_iters)
    return scheduler


def _resume(cfg: Any, engine: Any, scheduler: AnnealingLR, info: DistInfo, logger: RunLogger,
            plan: ParallelPlan) -> tuple[int, int]:
    """Load ``cfg.checkpoint.load`` if set; returns (start iteration, consumed train samples)."""
    ck = cfg.checkpoint
    if not ck.load:
        return 0, 0
    same_as_save = ck.save and Path(ck.load).resolve() == Path(ck.save).resolve()
    if same_as_save and not list_checkpoints(ck.load) and not (Path(ck.load) / "latest").exists():
        logger.info(f"load: {ck.load} holds no checkpoint yet (it is also the save folder): starting from scratch")
        return 0, 0
    weights_only = ck.finetune or ck.no_load_optim
    meta = load_checkpoint(ck.load, engine, rank=info.rank, world_size=info.world_size,
                           load_optim=not weights_only, load_rng=not (ck.no_load_rng or ck.finetune),
                           layout=plan.checkpoint_layout(), load_module=plan.module_loader(engine))
    if ck.finetune:
        logger.info(f"finetune: loaded weights from {meta['path']}, starting at iteration 0")
        return 0, 0
    client = meta.get("client_state", {})
    iteration = int(meta["iteration"])
    consumed = int(client.get("consumed_train_samples", 0))
    if "lr_scheduler" in client:
        ls = cfg.lr_schedule
        scheduler.load_state_dict(client["lr_scheduler"], override=bool(getattr(ls, "override_lr_scheduler", False)),
                                  use_checkpoint=bool(getattr(ls, "use_checkpoint_lr_scheduler", False)))
    engine.global_steps = iteration
    engine.global_samples = consumed
    dropped = logger.drop_rows_after(iteration)
    if dropped:
        logger.info(f"{logger.metrics_path}: dropped {dropped} row(s) of iterations after {iteration}, written before "
                    "this resume (the resumed run logs them again)")
    logger.info(f"resumed from {meta['path']} at iteration {iteration} ({consumed} samples consumed"
                f"{', optimizer state not loaded' if weights_only else ''})")
    return iteration, consumed


# ----------------------------------------------------------------------------------------------------------------
# the run


def pretrain(config: Any, *, stream: Any = None) -> TrainResult:
    """Train as configured. ``config`` is a resolved ``NeoXConfig``; it is copied, never modified."""
    cfg = copy.deepcopy(config)
    started = time.perf_counter()
    t, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
    device = resolve_device(t.device)
    check_device_support(device, t.precision, t.zero_stage)
    _check_supported(cfg)
    # the layout needs only the world size: refuse a bad one before any process-group work (config validation ran
    # the same check for the launch; this covers configs built in code and launches of a different size)
    from megatron.config.layout import check_config_layout

    check_config_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized()
                        else dist.get_world_size())
    # unwritable or full output folders fail here, before minutes of set-up and training
    check_output_dirs(cfg, dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0")))
    info = init_distributed(device, cfg.parallel.distributed_backend)
    quiet_deepspeed_logs()
    is_main = info.rank == 0
    wandb_cfg = comet_cfg = None
    if lg.use_wandb:
        wandb_cfg = {"project": lg.wandb_project, "group": lg.wandb_group, "team": lg.wandb_team,
                     "run_name": lg.wandb_run_name, "mode": lg.wandb_mode, "host": lg.wandb_host,
                     "all_ranks": lg.wandb_init_all_ranks}
    if lg.use_comet:
        comet_cfg = {"workspace": lg.comet_workspace, "project": lg.comet_project, "name": lg.comet_experiment_name,
                     "tags": lg.comet_tags, "others": lg.comet_others}
    logger = RunLogger(lg.log_dir, enabled=is_main, tensorboard_dir=lg.tensorboard_dir, wandb_cfg=wandb_cfg,
                       run_config=cfg.to_dict(), train_iters=t.train_iters, stream=stream, comet_cfg=comet_cfg,
                       rank=info.rank)
    try:
        with StopRequest() as stop:
            return _run(cfg, info, device, logger, started, stop)
    finally:
        logger.close()


def _run(cfg: Any, info: DistInfo, device: str, logger: RunLogger, started: float,
         stop: StopRequest) -> TrainResult:
    t, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
    set_seed(t.seed, info.rank)
    tokenizer = _build_tokenizer_and_vocab(cfg)
    plan = plan_parallel(cfg, info, device)
    ds_config = cfg.deepspeed_config(plan.dp_size, client_optimizer=True)
    own_norm = int(t.zero_stage) == 0 and t.precision == "fp32" and not plan.pipeline
    if own_norm:
        ds_config["gradient_clipping"] = 0.0  # clipped in train_step together with the norm we log
    micro, gas = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    global_batch = ds_config["train_batch_size"]
    seq = cfg.model.seq_length
    logger.info(f"device {device} | world size {info.world_size} ({info.backend}) | precision {t.precision} | "
                f"ZeRO {t.zero_stage} | global batch {global_batch} = micro {micro} x accum {gas} x dp "
                f"{plan.dp_size} | seq {seq} | {plan.describe()}")

    ensure_data(cfg.data, cfg.tokenizer, logger.info, may_prepare=info.rank == 0)
    barrier()
    tok = cfg.tokenizer
    check_token_ids(cfg.data, tokenizer.vocab_size, " ".join(filter(None, (tok.tokenizer_type, tok.vocab_file))))
    train_iters = t.train_iters
    if t.train_epochs is not None:  # GPT-NeoX: the run length follows from one epoch of the train split
        datasets, train_iters = build_epoch_datasets(cfg, micro, plan.dp_size, gas)
        logger.train_iters = train_iters
        logger.info(f"train_epochs {t.train_epochs}: {train_iters} iterations ({len(datasets.train.epoch)} samples "
                    f"per epoch)")
    else:
        datasets = build_datasets(cfg, global_batch, train_iters)

    profiler = StepProfiler(lg, lg.log_dir, device, info.rank, logger.info)  # memory history from model set-up
    try:
        return _train(cfg, info, device, logger, started, stop, tokenizer, plan, ds_config, own_norm, datasets,
                      train_iters, profiler)
    finally:
        profiler.close()


def _train(cfg: Any, info: DistInfo, device: str, logger: RunLogger, started: float, stop: StopRequest,
           tokenizer: Any, plan: ParallelPlan, ds_config: dict, own_norm: bool, datasets: Any, train_iters: int,
           profiler: StepProfiler) -> TrainResult:
    t, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
    micro, gas = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    global_batch = ds_config["train_batch_size"]
    seq = cfg.model.seq_length
    stepper = build_stepper(cfg, plan, info, device, ds_config, own_norm)
    engine, n_params = stepper.engine, stepper.n_params
    if ck.save:  # a disk too small for one checkpoint fails now, not at the first save
        _check_checkpoint_space(cfg, n_params, info, logger)
    scheduler = _make_scheduler(cfg, train_iters)
    diagnostics = StepDiagnostics(lg, engine.module, global_batch, t.precision)
    if diagnostics.reads_grads and isinstance(stepper, PlainStepper):
        stepper.on_boundary = diagnostics.on_boundary
    fpt = flops_per_token(cfg.model, seq, cfg.model.padded_vocab_size)
    peak, peak_source = (lg.peak_flops, "configured") if lg.peak_flops else default_peak_flops(device)
    if info.rank == 0:  # parameters per block, FLOPs per token, memory per GPU (megatron.training.size_summary)
        for line in summary_lines(summarize(cfg, data_parallel_size=plan.dp_size, micro_batch=micro,
                                            gradient_accumulation_steps=gas)):
            logger.info(line)
    logger.info("MFU peak: " + (f"{peak / 1e12:.3f} TFLOP/s ({peak_source})" if peak else f"n/a ({peak_source})"))

    iteration, consumed = _resume(cfg, engine, scheduler, info, logger, plan)
    result = TrainResult(iteration=iteration, log_dir=lg.log_dir)
    if iteration > 0 and iteration >= train_iters:
        logger.info(f"checkpoint at iteration {iteration} already reached train_iters {train_iters}: nothing to "
                    "train; raise --train-iters to continue")
        result.wall_time_s = time.perf_counter() - started
        return result
    eod = getattr(tokenizer, "eod", None)
    backend = getattr(engine.module, "attention_backend", None)
    retention = getattr(backend, "retention", None)
    settings = getattr(backend, "settings", None)      # SepLLM backends: print the KV ratio every N forwards
    print_every = settings.print_ratio_intervals if settings is not None and settings.print_kv_ratio else 0
    state = RunState(iteration=iteration, consumed=consumed, start_iteration=iteration)

    def on_forward() -> None:
        state.forward_calls += 1
        if retention is not None and print_every and state.forward_calls % print_every == 0:
            stats = {f"retention/{k}": v for k, v in retention.as_dict().items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "forward_calls"}
            if hasattr(retention, "format_line"):
                logger.info(retention.format_line())
            logger.log({"iteration": state.iteration, "train_forward_calls": state.forward_calls, **stats},
                       console=not hasattr(retention, "format_line"))

    if isinstance(stepper, PlainStepper):  # the pipeline engine runs its forwards inside train_batch: no hook
        stepper.on_forward = on_forward
    loader = build_loader(datasets.train, consumed, micro, plan.dp_rank, plan.dp_size,
                          num_workers=cfg.data.num_workers, pin_memory=device == "cuda")
    if loader is None and iteration < train_iters:
        raise DataSetupError("the training split is empty: check data paths and split")

    def micro_batches() -> Iterator[Batch]:
        for sample in loader:
            yield make_batch(sample, eod, t.eod_mask_loss, device)
        raise TrainingError("ran out of training samples before train_iters; the dataset was sized too small")

    batches = micro_batches()
    interval = _Interval()
    if ck.save and iteration == 0 and 0 in set(ck.extra_save_iters or ()):
        state.last_saved = _save(cfg, engine, scheduler, state, info, logger, result, plan)  # the init weights
    engine.train()
    exited = False
    first_iteration = state.iteration + 1
    while state.iteration < train_iters:
        if stop.agreed(device):  # every rank stops after the same iteration
            _stop(cfg, engine, scheduler, state, info, logger, result, plan, stop)
        state.iteration += 1
        iteration = state.iteration
        tick = time.perf_counter()
        profiler.before(iteration)
        lr = scheduler.apply(engine.optimizer.param_groups)
        local_loss, grad_norm = stepper.train_step(batches)
        if engine.was_step_applied():  # a skipped fp16 step does not advance GPT-NeoX's schedule
            scheduler.advance()
        profiler.after(iteration)
        loss = _mean_over_ranks(local_loss, info)
        if device == "cuda":
            torch.cuda.synchronize()
        interval.time_s += time.perf_counter() - tick
        state.consumed += global_batch
        consumed = state.consumed
        interval.loss_sum += loss
        interval.iters += 1
        interval.tokens += global_batch * seq
        result.train_losses[iteration] = loss

        if diagnostics.active:  # GPT-NeoX logs these every iteration
            per_param, main = diagnostics.rows(engine)
            if per_param:
                logger.log_all_ranks({"iteration": iteration, **per_param})
            if main:
                logger.log({"iteration": iteration, **main}, console=False)
        if iteration % lg.log_interval == 0 or iteration == train_iters:
            tps = interval.tokens / max(interval.time_s, 1e-9)
            row: dict[str, Any] = {"iteration": iteration, "lm_loss": interval.loss_sum / interval.iters, "lr": lr,
                                   "grad_norm": grad_norm, "tokens_per_sec": tps,
                                   "step_time_ms": 1000.0 * interval.time_s / interval.iters,
                                   "consumed_samples": consumed, "mfu": mfu(tps, fpt, peak, info.world_size)}
            if t.precision == "fp16":
                row["loss_scale"] = (getattr(engine.optimizer, "cur_scale", None)
                                     or getattr(engine.optimizer, "loss_scale", None))
                row["skipped_iters"] = engine.skipped_steps
            if lg.log_memory:
                row["memory_gb"] = _memory_gb(device)
            logger.log(row)
            result.tokens_per_sec = tps
            interval.reset()
        elif iteration == first_iteration:
            # console only, so that a user sees the loss at once; the interval's row (metrics.jsonl, TensorBoard)
            # still averages every iteration since the last one, as GPT-NeoX logs it
            logger.info(format_console_line({"iteration": iteration, "lm_loss": loss, "lr": lr,
                                             "grad_norm": grad_norm, "step_time_ms": 1000.0 * interval.time_s},
                                            train_iters) + f" (first iteration; then every {lg.log_interval})")

        if ck.save and should_save(iteration, ck.checkpoint_factor, ck.extra_save_iters):
            state.last_saved = _save(cfg, engine, scheduler, state, info, logger, result, plan)
        if t.eval_interval and iteration % t.eval_interval == 0 and t.eval_iters > 0:
            _validate(cfg, stepper, datasets.valid, "valid", iteration, micro, gas, eod, device, logger, result, plan)
        if t.exit_interval and iteration % t.exit_interval == 0:  # GPT-NeoX: exits here, nothing else saved or run
            logger.info(f"exit_interval {t.exit_interval}: exiting after iteration {iteration}")
            exited = True
            break

    iteration = state.iteration
    if ck.save and state.last_saved != iteration and iteration > 0 and not exited:  # GPT-NeoX saves at the end
        _save(cfg, engine, scheduler, state, info, logger, result, plan)
    if t.do_test and t.eval_iters > 0 and not exited:
        _validate(cfg, stepper, datasets.test, "test", iteration, micro, gas, eod, device, logger, result, plan)
    result.iteration = iteration
    result.wall_time_s = time.perf_counter() - started
    logger.info(f"done: {iteration} iterations in {result.wall_time_s:.1f} s")
    return result


def _stop(cfg: Any, engine: Any, scheduler: AnnealingLR, state: RunState, info: DistInfo, logger: RunLogger,
          result: TrainResult, plan: ParallelPlan, stop: StopRequest) -> None:
    """Save at the current iteration boundary (when ``save`` is set) and raise TrainingInterrupted."""
    iteration = state.iteration
    what = f"stopped by {stop.signal_name} after iteration {iteration}"
    if iteration == state.start_iteration:
        raise TrainingInterrupted(f"{what}: nothing trained in this run, no checkpoint written", stop.exit_code)
    if not cfg.checkpoint.save:
        raise TrainingInterrupted(f"{what}: no checkpoint written ('save' is not set)", stop.exit_code)
    if state.last_saved != iteration:
        _save(cfg, engine, scheduler, state, info, logger, result, plan)
    raise TrainingInterrupted(f"{what}: checkpoint {Path(cfg.checkpoint.save) / f'global_step{iteration}'} saved; "
                              f"resume with --load {cfg.checkpoint.save}", stop.exit_code)


def _save(cfg: Any, engine: Any, scheduler: AnnealingLR, state: RunState, info: DistInfo, logger: RunLogger,
          result: TrainResult, plan: ParallelPlan) -> int:
    iteration, consumed = state.iteration, state.consumed
    tick = time.perf_counter()
    client = {"iteration": iteration, "consumed_train_samples": consumed, "lr_scheduler": scheduler.state_dict(),
              "seed": cfg.training.seed}
    path = save_checkpoint(cfg.checkpoint.save, iteration, engine, rank=info.rank, world_size=info.world_size,
                           client_state=client, config_yaml=cfg.to_yaml(),
                           keep_last_n=cfg.checkpoint.keep_last_n_checkpoints, layout=plan.checkpoint_layout(),
                           module_state=plan.module_state(engine), save_optim=not cfg.checkpoint.no_save_optim,
                           save_rng=not cfg.checkpoint.no_save_rng)
    result.checkpoints.append(str(path))
    logger.info(f"saved checkpoint {path} ({time.perf_counter() - tick:.2f} s)")
    return iteration


def _validate(cfg: Any, stepper: Stepper, dataset: Any, split: str, iteration: int, micro: int, gas: int,
              eod: int | None, device: str, logger: RunLogger, result: TrainResult, plan: ParallelPlan) -> None:
    loss = evaluate(stepper, dataset, cfg.training.eval_iters * gas, micro, plan, eod, cfg.training.eod_mask_loss,
                    device)
    if loss is None:
        logger.info(f"{split}: the {split} split is empty, skipped")
        return
    if split == "valid":
        result.valid_losses[iteration] = loss
    else:
        result.test_loss = loss
    import math

    logger.log({"iteration": iteration, f"{split}_lm_loss": loss, f"{split}_ppl": math.exp(min(loss, 50.0))})


__all__ = ["TrainResult", "TrainingError", "CheckpointError", "evaluate", "pretrain", "train_step"]
