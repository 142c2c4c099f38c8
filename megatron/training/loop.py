"""The pretraining loop: build everything from a resolved config, then drive it (step, log, checkpoint, validate).

Order inside an iteration ``it`` (1-indexed): set the LR for ``it`` -> ``stepper.train_step`` over
``gradient_accumulation_steps`` micro-batches (:mod:`megatron.training.steppers`: forward, ``engine.backward``,
``engine.step``; DeepSpeed applies the optimizer at the accumulation boundary) -> log -> save (``checkpoint_factor`` /
``extra_save_iters``) -> validate (``eval_interval``). A checkpoint taken after iteration ``k`` holds everything
iteration ``k + 1`` depends on (weights, optimizer, RNG, consumed samples), so a resumed run reproduces the
uninterrupted one bit for bit on the same hardware and world size.

Parallelism (see :mod:`megatron.training.parallel_setup`): ranks are laid out ``(pipe, data, model)``; data loaders
are sliced by DATA-parallel rank; ``model-parallel-size > 1`` shards the model with ``apply_tensor_parallel`` and
gives DeepSpeed the mpu; ``pipe-parallel-size >= 2`` replaces the micro-batch loop by DeepSpeed's pipeline engine
(``engine.train_batch``). ``pipe-parallel-size`` 0 and 1 both run the plain engine (numerically identical to a
one-stage pipeline, and without the pipeline engine's ZeRO <= 1 restriction).

After set-up every helper takes the one :class:`~megatron.training.run.Run` (config, engine, schedule, stepper,
plan, logger, state, result).
"""

from __future__ import annotations

import copy
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron.checkpoint.format import list_checkpoints
from megatron.training.async_checkpoint import AsyncCheckpointWriter
from megatron.training.batches import Batch, BatchRules, make_batch
from megatron.training.checkpointing import RunSnapshot, load_checkpoint, save_checkpoint, should_save
from megatron.config.errors import ConfigError
from megatron.config.derived import decay_iters
from megatron.training.data_setup import (DataSetupError, SplitDatasets, build_datasets, build_epoch_datasets,
                                          build_loader, check_token_ids, dropped_documents_note, ensure_data)
from megatron.training import run_folder
from megatron.training.distributed import (DistInfo, barrier, broadcast_object, init_distributed, mean_over_ranks,
                                          set_seed)
from megatron.training.engine import check_device_support, quiet_deepspeed_logs, resolve_device
from megatron.training.flops import default_peak_flops, flops_per_token, mfu
from megatron.training.interrupt import StopRequest, TrainingInterrupted
from megatron.training.logging import RunLogger, format_console_line
from megatron.training.diagnostics import StepDiagnostics
from megatron.training.dpo import set_up_reference, use_dpo
from megatron.training.lr_schedules import AnnealingLR, resolve_warmup_iters
from megatron.training.parallel_setup import ParallelPlan, plan_parallel
from megatron.training.preflight import RunLimitError, check_output_dirs, check_sequence_fits_data
from megatron.training.profiling import StepProfiler
from megatron.training.run import Run, TrainResult
from megatron.training.size_summary import format_bytes, summarize, summary_lines
from megatron.training.steppers import PlainStepper, TrainingError, build_stepper, evaluate

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


@dataclass
class _Interval:
    """Running sums between two log lines, and the constants that turn them into throughput and MFU."""

    flops_per_token: float
    peak_flops: Optional[float]
    loss_sum: float = 0.0
    iters: int = 0
    tokens: int = 0
    time_s: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)  # the stepper's extra metrics (DPO's rewards)

    def reset(self) -> None:
        self.loss_sum, self.iters, self.tokens, self.time_s = 0.0, 0, 0, 0.0
        self.metric_sums = {}


def _memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------
# set-up


def _check_before_start(cfg: NeoXConfig) -> str:
    """Everything that can be refused before any process-group work; returns the device to run on."""
    t = cfg.training
    device = resolve_device(t.device)
    check_device_support(device, t.precision, t.zero_stage)
    if getattr(t, "train_epochs", None) is None and (t.train_iters is None or t.train_iters < 0):
        raise ConfigError(f"train_iters (or train_epochs) must be set to a number >= 0, got {t.train_iters!r}")
    # the layout needs only the world size: refuse a bad one before any process-group work (config validation ran
    # the same check for the launch; this covers configs built in code and launches of a different size)
    from megatron.config.layout import check_config_layout

    check_config_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized()
                        else dist.get_world_size())
    # unwritable or full output folders fail here, before minutes of set-up and training
    check_output_dirs(cfg, dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0")))
    return device


def _make_logger(cfg: NeoXConfig, info: DistInfo, stream: Any) -> RunLogger:
    lg = cfg.logging
    wandb_cfg = comet_cfg = None
    if lg.use_wandb:
        wandb_cfg = {"project": lg.wandb_project, "group": lg.wandb_group, "team": lg.wandb_team,
                     "run_name": lg.wandb_run_name, "mode": lg.wandb_mode, "host": lg.wandb_host,
                     "all_ranks": lg.wandb_init_all_ranks}
    if lg.use_comet:
        comet_cfg = {"workspace": lg.comet_workspace, "project": lg.comet_project, "name": lg.comet_experiment_name,
                     "tags": lg.comet_tags, "others": lg.comet_others}
    return RunLogger(lg.log_dir, enabled=info.rank == 0, tensorboard_dir=lg.tensorboard_dir, wandb_cfg=wandb_cfg,
                     run_config=cfg.to_dict(), train_iters=cfg.training.train_iters, stream=stream,
                     comet_cfg=comet_cfg, rank=info.rank)


def _build_tokenizer_and_vocab(cfg: NeoXConfig) -> Any:
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


def _build_data(cfg: NeoXConfig, info: DistInfo, plan: ParallelPlan, ds_config: dict, tokenizer: Any,
                logger: RunLogger) -> tuple[SplitDatasets, int]:
    """The train / valid / test datasets (prepared first when a bundled corpus is named) and the run length."""
    t = cfg.training
    micro, gas = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    ensure_data(cfg.data, cfg.tokenizer, logger.info, may_prepare=info.rank == 0)
    barrier()
    tok = cfg.tokenizer
    check_token_ids(cfg.data, tokenizer.vocab_size, " ".join(filter(None, (tok.tokenizer_type, tok.vocab_file))))
    if t.train_epochs is not None:  # GPT-NeoX: the run length follows from one epoch of the train split
        datasets, train_iters = build_epoch_datasets(cfg, micro, plan.dp_size, gas)
        logger.train_iters = train_iters
        logger.info(f"train_epochs {t.train_epochs}: {train_iters} iterations ({len(datasets.train.epoch)} samples "
                    f"per epoch)")
    else:
        datasets, train_iters = build_datasets(cfg, ds_config["train_batch_size"], t.train_iters), t.train_iters
    note = dropped_documents_note(datasets)
    if note:
        logger.info(note)
    return datasets, train_iters


def _check_checkpoint_space(cfg: NeoXConfig, n_params: int, info: DistInfo, logger: RunLogger) -> None:
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


def _check_memory(cfg: NeoXConfig, info: DistInfo, plan: ParallelPlan, micro: int, gas: int, device: str) -> None:
    """Rank 0 compares the ``--summary`` memory estimate with the machine's memory; every rank gets the verdict."""
    from megatron.training.preflight import available_memory, check_memory_fits

    verdict = None
    if info.rank == 0:
        s = summarize(cfg, data_parallel_size=plan.dp_size, micro_batch=micro, gradient_accumulation_steps=gas)
        checkpointed = s.checkpoint_activations
        acts = s.gpu.activations_checkpointed if checkpointed else s.gpu.activations
        processes = 1 if device == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        try:
            check_memory_fits(s.gpu.total(checkpointed), processes, available_memory(device),
                              f"training state {format_bytes(s.gpu.state.total)} + activations of micro batch "
                              f"{micro} x seq_length {cfg.model.seq_length} {format_bytes(acts)}")
        except RunLimitError as exc:
            verdict = str(exc)
    verdict = broadcast_object(verdict)
    if verdict:
        raise RunLimitError(verdict)


def _make_scheduler(cfg: NeoXConfig, train_iters: int) -> AnnealingLR:
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


def _resume(run: Run) -> None:
    """Load ``checkpoint.load`` if set: sets the run's start iteration and consumed train samples."""
    cfg, engine, info, logger, plan, state = run.config, run.engine, run.info, run.logger, run.plan, run.state
    ck = cfg.checkpoint
    if not ck.load:
        return
    same_as_save = ck.save and Path(ck.load).resolve() == Path(ck.save).resolve()
    if same_as_save and not list_checkpoints(ck.load) and not (Path(ck.load) / "latest").exists():
        logger.info(f"load: {ck.load} holds no checkpoint yet (it is also the save folder): starting from scratch")
        return
    weights_only = ck.finetune or ck.no_load_optim
    meta = load_checkpoint(ck.load, engine, rank=info.rank, world_size=info.world_size,
                           load_optim=not weights_only, load_rng=not (ck.no_load_rng or ck.finetune),
                           layout=plan.checkpoint_layout(), load_module=plan.module_loader(engine))
    if ck.finetune:
        logger.info(f"finetune: loaded weights from {meta['path']}, starting at iteration 0")
        return
    client = meta.get("client_state", {})
    iteration = int(meta["iteration"])
    consumed = int(client.get("consumed_train_samples", 0))
    if "lr_scheduler" in client:
        ls = cfg.lr_schedule
        run.scheduler.load_state_dict(client["lr_scheduler"],
                                      override=bool(getattr(ls, "override_lr_scheduler", False)),
                                      use_checkpoint=bool(getattr(ls, "use_checkpoint_lr_scheduler", False)))
    engine.global_steps = iteration
    engine.global_samples = consumed
    for note in meta.get("resume_notes", ()):
        logger.info(f"resume: {note}")
    saved_batch = meta.get("global_batch_size")
    if saved_batch is not None and int(saved_batch) != run.global_batch:
        logger.info(f"resume: global batch changes from {saved_batch} (checkpoint, data parallel size "
                    f"{meta.get('data_parallel_size', '?')}) to {run.global_batch} (data parallel size {plan.dp_size});"
                    f" training continues at sample {consumed}, each step now reads {run.global_batch} samples")
    dropped = logger.drop_rows_after(iteration)
    if dropped:
        logger.info(f"{logger.metrics_path}: dropped {dropped} row(s) of iterations after {iteration}, written before "
                    "this resume (the resumed run logs them again)")
    logger.info(f"resumed from {meta['path']} at iteration {iteration} ({consumed} samples consumed"
                f"{', optimizer state not loaded' if weights_only else ''})")
    state.iteration = state.start_iteration = iteration
    state.consumed = consumed


# ----------------------------------------------------------------------------------------------------------------
# the run


def pretrain(config: NeoXConfig, *, stream: Any = None) -> TrainResult:
    """Train as configured. ``config`` is a resolved ``NeoXConfig``; it is copied, never modified."""
    cfg = copy.deepcopy(config)
    started = time.perf_counter()
    device = _check_before_start(cfg)
    info = init_distributed(device, cfg.parallel.distributed_backend)
    quiet_deepspeed_logs()
    folder, verdict = run_folder.claim(cfg, info.rank)  # one run per save folder and metrics.jsonl
    verdict = broadcast_object(verdict)
    if verdict.error:
        raise run_folder.RunFolderError(verdict.error)
    if verdict.load is not None:
        cfg.checkpoint.load = verdict.load
    try:
        logger = _make_logger(cfg, info, stream)
        try:
            for note in verdict.notes:
                logger.info(note)
            with StopRequest() as stop:
                return _set_up_and_train(cfg, info, device, logger, stop, started)
        finally:
            logger.close()
    finally:
        folder.release()


def _set_up_and_train(cfg: NeoXConfig, info: DistInfo, device: str, logger: RunLogger, stop: StopRequest,
                      started: float) -> TrainResult:
    """Seed, tokenizer, layout, data, model and engine, schedule -> one :class:`Run` -> :func:`_train`."""
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
    logger.info(f"device {device} | world size {info.world_size} ({info.backend}) | precision {t.precision} | "
                f"ZeRO {t.zero_stage} | global batch {global_batch} = micro {micro} x accum {gas} x dp "
                f"{plan.dp_size} | seq {cfg.model.seq_length} | {plan.describe()}")
    _check_memory(cfg, info, plan, micro, gas, device)
    datasets, train_iters = _build_data(cfg, info, plan, ds_config, tokenizer, logger)
    check_sequence_fits_data(datasets, cfg.model.seq_length)

    profiler = StepProfiler(lg, lg.log_dir, device, info.rank, logger.info)  # memory history from model set-up
    try:
        stepper = build_stepper(cfg, plan, info, device, ds_config, own_norm)
        if t.train_impl == "dpo":
            use_dpo(stepper, cfg, info)
        if ck.save:  # a disk too small for one checkpoint fails now, not at the first save
            _check_checkpoint_space(cfg, stepper.n_params, info, logger)
        run = Run(config=cfg, info=info, device=device, logger=logger, plan=plan, stepper=stepper,
                  scheduler=_make_scheduler(cfg, train_iters), datasets=datasets, micro_batch=micro, gas=gas,
                  global_batch=global_batch, train_iters=train_iters, batch_rules=BatchRules.of(cfg, getattr(tokenizer, "eod", None)),
                  stop=stop, started=started, result=TrainResult(iteration=0, log_dir=lg.log_dir),
                  checkpoint_writer=AsyncCheckpointWriter(info.world_size) if ck.save and ck.checkpoint_async
                  else None)
        aborted = False
        try:
            return _train(run, profiler)
        except KeyboardInterrupt as exc:  # a second Ctrl-C aborts at once: the write in flight is left unfinished
            aborted = not isinstance(exc, TrainingInterrupted)
            raise
        finally:
            if run.checkpoint_writer is not None and not aborted:  # a failed run still lets the write finish
                run.checkpoint_writer.join()
    finally:
        profiler.close()


def _train(run: Run, profiler: StepProfiler) -> TrainResult:
    cfg, state, result, logger = run.config, run.state, run.result, run.logger
    t, ck, lg = cfg.training, cfg.checkpoint, cfg.logging
    diagnostics = StepDiagnostics(lg, run.engine.module, run.global_batch, t.precision)
    if diagnostics.reads_grads and isinstance(run.stepper, PlainStepper):
        run.stepper.on_boundary = diagnostics.on_boundary
    interval = _Interval(*_log_sizes(run))
    _resume(run)
    result.iteration = state.iteration
    if state.iteration > 0 and state.iteration >= run.train_iters:
        logger.info(f"checkpoint at iteration {state.iteration} already reached train_iters {run.train_iters}: "
                    "nothing to train; raise --train-iters to continue")
        result.wall_time_s = time.perf_counter() - run.started
        return result
    set_up_reference(run)  # DPO's frozen reference model: the weights the run starts from
    if isinstance(run.stepper, PlainStepper):  # the pipeline engine runs its forwards inside train_batch: no hook
        run.stepper.on_forward = _forward_hook(run)
    if run.stepper.first_step is not None:  # compile: the first step's time goes to the run's log
        run.stepper.first_step.log = logger.info
    batches = _micro_batches(run)
    if ck.save and state.iteration == 0 and 0 in set(ck.extra_save_iters or ()):
        _save(run)  # the init weights
    run.engine.train()
    exited = False
    first_iteration = state.iteration + 1
    while state.iteration < run.train_iters:
        if run.stop.agreed(run.device):  # every rank stops after the same iteration
            _stop(run)
        state.iteration += 1
        iteration = state.iteration
        tick = time.perf_counter()
        profiler.before(iteration)
        lr = run.scheduler.apply(run.engine.optimizer.param_groups)
        local_loss, grad_norm = run.stepper.train_step(batches)
        for key, value in run.stepper.step_metrics().items():
            interval.metric_sums[key] = interval.metric_sums.get(key, 0.0) + value
        if run.engine.was_step_applied():  # a skipped fp16 step does not advance GPT-NeoX's schedule
            run.scheduler.advance()
        profiler.after(iteration)
        loss = mean_over_ranks(local_loss, run.info)
        if run.device == "cuda":
            torch.cuda.synchronize()
        interval.time_s += time.perf_counter() - tick
        state.consumed += run.global_batch
        interval.loss_sum += loss
        interval.iters += 1
        # a DPO sample is a pair: two sequences through the trained model (the reference's forward is not counted)
        interval.tokens += run.global_batch * cfg.model.seq_length * (2 if t.train_impl == "dpo" else 1)
        result.train_losses[iteration] = loss

        if diagnostics.active:  # GPT-NeoX logs these every iteration
            per_param, main = diagnostics.rows(run.engine)
            if per_param:
                logger.log_all_ranks({"iteration": iteration, **per_param})
            if main:
                logger.log({"iteration": iteration, **main}, console=False)
        _log_iteration(run, interval, loss, lr, grad_norm, first=iteration == first_iteration)

        if ck.save and should_save(iteration, ck.checkpoint_factor, ck.extra_save_iters):
            _save(run)
        if t.eval_interval and iteration % t.eval_interval == 0 and t.eval_iters > 0:
            _validate(run, "valid")
        if t.exit_interval and iteration % t.exit_interval == 0:  # GPT-NeoX: exits here, nothing else saved or run
            logger.info(f"exit_interval {t.exit_interval}: exiting after iteration {iteration}")
            exited = True
            break

    iteration = state.iteration
    if ck.save and state.last_saved != iteration and iteration > 0 and not exited:  # GPT-NeoX saves at the end
        _save(run)
    _wait_for_save(run)
    if t.do_test and t.eval_iters > 0 and not exited:
        _validate(run, "test")
    result.iteration = iteration
    result.wall_time_s = time.perf_counter() - run.started
    logger.info(f"done: {iteration} iterations in {result.wall_time_s:.1f} s")
    return result


def _log_sizes(run: Run) -> tuple[float, Optional[float]]:
    """Rank 0 prints parameters per block, FLOPs per token and memory per GPU (``megatron.training.size_summary``);
    every rank prints the MFU peak. Returns (training FLOPs per token, peak FLOP/s or None) for the MFU column."""
    cfg, lg = run.config, run.config.logging
    fpt = flops_per_token(cfg.model, cfg.model.seq_length, cfg.model.padded_vocab_size)
    peak, peak_source = (lg.peak_flops, "configured") if lg.peak_flops else default_peak_flops(run.device)
    if run.info.rank == 0:
        for line in summary_lines(summarize(cfg, data_parallel_size=run.plan.dp_size, micro_batch=run.micro_batch,
                                            gradient_accumulation_steps=run.gas)):
            run.logger.info(line)
    run.logger.info("MFU peak: " + (f"{peak / 1e12:.3f} TFLOP/s ({peak_source})" if peak else f"n/a ({peak_source})"))
    return fpt, peak


def _forward_hook(run: Run) -> Callable[[], None]:
    """Counts forwards; SepLLM backends with ``print_kv_ratio`` log their KV retention every N forwards."""
    state, logger = run.state, run.logger
    backend = getattr(run.engine.module, "attention_backend", None)
    retention = getattr(backend, "retention", None)
    settings = getattr(backend, "settings", None)
    print_every = settings.print_ratio_intervals if settings is not None and settings.print_kv_ratio else 0

    def on_forward() -> None:
        state.forward_calls += 1
        if retention is not None and print_every and state.forward_calls % print_every == 0:
            stats = {f"retention/{k}": v for k, v in retention.as_dict().items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "forward_calls"}
            if hasattr(retention, "format_line"):
                logger.info(retention.format_line())
            logger.log({"iteration": state.iteration, "train_forward_calls": state.forward_calls, **stats},
                       console=not hasattr(retention, "format_line"))

    return on_forward


def _micro_batches(run: Run) -> Iterator[Batch]:
    """This rank's training micro-batches from the run's consumed-sample position on (the loader is built now, so
    an empty split fails before training)."""
    cfg, plan = run.config, run.plan
    loader = build_loader(run.datasets.train, run.state.consumed, run.micro_batch, plan.dp_rank, plan.dp_size,
                          num_workers=cfg.data.num_workers, pin_memory=run.device == "cuda")
    if loader is None and run.state.iteration < run.train_iters:
        raise DataSetupError("the training split is empty: check data paths and split")
    return _batches_from(loader, run.batch_rules, run.device, run.stepper.batch_of)


def _batches_from(loader: Any, rules: BatchRules, device: str,
                  batch_of: Callable[[Any, BatchRules, str], Any] = make_batch) -> Iterator[Batch]:
    for sample in loader:
        yield batch_of(sample, rules, device)
    raise TrainingError("ran out of training samples before train_iters; the dataset was sized too small")


def _log_iteration(run: Run, interval: _Interval, loss: float, lr: float, grad_norm: float | None,
                   first: bool) -> None:
    """The interval's row every ``log_interval`` iterations (and at the last); the first iteration's loss on the
    console at once."""
    cfg, engine, iteration = run.config, run.engine, run.state.iteration
    t, lg = cfg.training, cfg.logging
    if iteration % lg.log_interval == 0 or iteration == run.train_iters:
        tps = interval.tokens / max(interval.time_s, 1e-9)
        row: dict[str, Any] = {"iteration": iteration, "lm_loss": interval.loss_sum / interval.iters, "lr": lr,
                               "grad_norm": grad_norm, "tokens_per_sec": tps,
                               "step_time_ms": 1000.0 * interval.time_s / interval.iters,
                               "consumed_samples": run.state.consumed,
                               "mfu": mfu(tps, interval.flops_per_token, interval.peak_flops, run.info.world_size),
                               **{k: v / interval.iters for k, v in interval.metric_sums.items()}}
        if t.precision == "fp16":
            row["loss_scale"] = (getattr(engine.optimizer, "cur_scale", None)
                                 or getattr(engine.optimizer, "loss_scale", None))
            row["skipped_iters"] = engine.skipped_steps
        if lg.log_memory:
            row["memory_gb"] = _memory_gb(run.device)
        run.logger.log(row)
        run.result.tokens_per_sec = tps
        interval.reset()
    elif first:
        # console only, so that a user sees the loss at once; the interval's row (metrics.jsonl, TensorBoard)
        # still averages every iteration since the last one, as GPT-NeoX logs it
        run.logger.info(format_console_line({"iteration": iteration, "lm_loss": loss, "lr": lr,
                                             "grad_norm": grad_norm, "step_time_ms": 1000.0 * interval.time_s},
                                            run.train_iters) + f" (first iteration; then every {lg.log_interval})")


def _stop(run: Run) -> None:
    """Save at the current iteration boundary (when ``save`` is set) and raise TrainingInterrupted."""
    cfg, state, stop = run.config, run.state, run.stop
    iteration = state.iteration
    what = f"stopped by {stop.signal_name} after iteration {iteration}"
    if iteration == state.start_iteration:
        raise TrainingInterrupted(f"{what}: nothing trained in this run, no checkpoint written", stop.exit_code)
    if not cfg.checkpoint.save:
        raise TrainingInterrupted(f"{what}: no checkpoint written ('save' is not set)", stop.exit_code)
    if state.last_saved != iteration:
        _save(run)
    _wait_for_save(run)  # the signal waits for the checkpoint's write
    raise TrainingInterrupted(f"{what}: checkpoint {Path(cfg.checkpoint.save) / f'global_step{iteration}'} saved; "
                              f"resume with --load {cfg.checkpoint.save}", stop.exit_code)


def _save(run: Run) -> None:
    """Checkpoint the current iteration (weights, optimizer, RNG, schedule, consumed samples)."""
    cfg, engine, info, plan, scheduler = run.config, run.engine, run.info, run.plan, run.scheduler
    iteration, consumed = run.state.iteration, run.state.consumed
    writer = run.checkpoint_writer
    _wait_for_save(run)  # one checkpoint in flight at a time
    tick = time.perf_counter()
    snapshot = RunSnapshot(iteration=iteration, consumed_train_samples=consumed, lr_scheduler=scheduler.state_dict(),
                           seed=cfg.training.seed, config_yaml=cfg.to_yaml(),
                           save_optim=not cfg.checkpoint.no_save_optim, save_rng=not cfg.checkpoint.no_save_rng)
    path = save_checkpoint(cfg.checkpoint.save, engine, snapshot, rank=info.rank, world_size=info.world_size,
                           layout=plan.checkpoint_layout(), module_state=plan.module_state(engine),
                           keep_last_n=cfg.checkpoint.keep_last_n_checkpoints,
                           background=writer.submit if writer is not None else None)
    run.state.last_saved = iteration
    if writer is not None:
        run.logger.info(f"checkpoint {path.name}: state copied in {time.perf_counter() - tick:.2f} s, writing in the "
                        "background")
        return
    run.result.checkpoints.append(str(path))
    run.logger.info(f"saved checkpoint {path} ({time.perf_counter() - tick:.2f} s)")


def _wait_for_save(run: Run) -> None:
    """``checkpoint_async``: finish (and with several ranks publish) the checkpoint in flight; a failed write
    raises here (exit 1)."""
    done = run.checkpoint_writer.wait() if run.checkpoint_writer is not None else None
    if done is not None:
        path, seconds = done
        run.result.checkpoints.append(str(path))
        run.logger.info(f"saved checkpoint {path} (written in the background in {seconds:.2f} s)")


def _validate(run: Run, split: str) -> None:
    """Loss and perplexity on the ``valid`` or ``test`` split, logged and kept in the result."""
    t, iteration = run.config.training, run.state.iteration
    dataset = run.datasets.valid if split == "valid" else run.datasets.test
    loss = evaluate(run.stepper, dataset, t.eval_iters * run.gas, run.micro_batch, run.plan,
                    run.batch_rules, run.device)
    if loss is None:
        run.logger.info(f"{split}: the {split} split is empty, skipped")
        return
    if split == "valid":
        run.result.valid_losses[iteration] = loss
    else:
        run.result.test_loss = loss
    extra = {f"{split}_{key}": value for key, value in run.stepper.eval_metrics().items()}  # DPO: valid_margins, ...
    if t.train_impl != "dpo":  # a perplexity of the DPO loss means nothing
        extra[f"{split}_ppl"] = math.exp(min(loss, 50.0))
    run.logger.log({"iteration": iteration, f"{split}_lm_loss": loss, **extra})


__all__ = ["pretrain"]
