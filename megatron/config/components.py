"""Small typed config objects, one per component (optimizer, schedule, data, ...).

Field names are the GPT-NeoX / DeepSpeed key names with ``-`` written as ``_``; every field carries a ``help`` text in
its metadata, from which ``docs/config_reference.md`` is generated. Fields marked ``derived`` are computed by
validation (``megatron.config.validate``); setting them in YAML is allowed only with the value validation derives.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with a documented default (mutable defaults are copied per instance)."""
    metadata = {"help": help, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class OptimizerConfig:
    type: str = opt("Adam", "Optimizer: Adam | AdamW | SGD (case-insensitive, normalised to this spelling). Adam "
                            "applies decoupled weight decay like GPT-NeoX/DeepSpeed do.")
    lr: float = opt(6.0e-4, "Peak learning rate (DeepSpeed `optimizer.params.lr`; a top-level `lr` key also lands here).")
    betas: list = opt([0.9, 0.999], "Adam(W) betas [beta1, beta2] (`optimizer.params.betas`).")
    eps: float = opt(1.0e-8, "Adam(W) epsilon (`optimizer.params.eps`).")
    momentum: float = opt(0.0, "SGD momentum (`optimizer.params.momentum`).")
    weight_decay: float = opt(0.01, "Weight decay. GPT-NeoX top-level `weight-decay` and "
                                    "`optimizer.params.weight_decay` both map here.")
    params: dict = opt({}, "The whole resolved `optimizer.params` block (lr, betas, eps, weight_decay and any other "
                           "optimizer argument such as `torch_adam`), passed to DeepSpeed verbatim.")


@dataclass
class LRScheduleConfig:
    lr_decay_style: str = opt("linear", "Learning-rate decay after warmup: constant | linear | cosine.")
    lr_decay_iters: Optional[int] = opt(None, "Iterations over which the rate decays to `min_lr` (None -> train_iters).",
                                        derived=True)
    min_lr: float = opt(0.0, "Floor of the decayed learning rate.")
    warmup: float = opt(0.01, "Linear warmup length as a FRACTION of lr_decay_iters (GPT-NeoX meaning).")
    warmup_iters: Optional[int] = opt(None, "Warmup in iterations; derived as round(warmup * lr_decay_iters) unless "
                                            "`warmup-iters` is given explicitly.", derived=True)


@dataclass
class DataConfig:
    data_path: Optional[str] = opt(None, "Prefix of one tokenized `.bin/.idx` pair, split into train/valid/test by "
                                         "`split`.")
    train_data_paths: Optional[list] = opt(None, "Prefixes of training `.bin/.idx` pairs (blended by weights).")
    valid_data_paths: Optional[list] = opt(None, "Prefixes of validation `.bin/.idx` pairs.")
    test_data_paths: Optional[list] = opt(None, "Prefixes of test `.bin/.idx` pairs.")
    train_data_weights: Optional[list] = opt(None, "Blend weights of train_data_paths (same length; None = equal).")
    valid_data_weights: Optional[list] = opt(None, "Blend weights of valid_data_paths.")
    test_data_weights: Optional[list] = opt(None, "Blend weights of test_data_paths.")
    split: str = opt("969, 30, 1", "train, valid, test proportions of `data_path` (comma-separated).")
    data_impl: str = opt("mmap", "Indexed dataset implementation; only mmap (Megatron MMIDIDX) is supported.")
    num_workers: int = opt(2, "DataLoader worker processes per rank.")
    mmap_warmup: bool = opt(False, "Touch every page of the memory-mapped data once at start-up.")
    weight_by_num_documents: bool = opt(False, "Blend datasets by document count (weights ~ n_docs^alpha) instead of "
                                               "the given weights.")
    weighted_sampler_alpha: float = opt(1.0, "Exponent alpha of weight_by_num_documents.")
    data_cache_dir: Optional[str] = opt(None, "Where index maps (doc/sample/shuffle .npy) are cached; None = next to "
                                              "the data.")
    use_shared_fs: bool = opt(True, "True: the data folder is shared by all nodes, only global rank 0 builds index "
                                    "maps; False: local rank 0 of every node builds them.")


@dataclass
class TokenizerConfig:
    tokenizer_type: str = opt("GPT2BPETokenizer", "HFTokenizer | HFGPT2Tokenizer | GPT2BPETokenizer | SPMTokenizer | "
                                                  "CharLevelTokenizer.")
    vocab_file: Optional[str] = opt(None, "Tokenizer file: HF `tokenizer.json` (HFTokenizer), GPT-2 `vocab.json` "
                                          "(GPT2BPETokenizer), SentencePiece model (SPMTokenizer).")
    merge_file: Optional[str] = opt(None, "GPT-2 BPE `merges.txt` (GPT2BPETokenizer only).")


@dataclass
class TrainingConfig:
    train_iters: Optional[int] = opt(None, "Number of optimizer steps to train (required for training).")
    train_batch_size: Optional[int] = opt(None, "Global batch = micro x grad-accum x data-parallel size. Give any two "
                                                "of the three batch keys; all three must be consistent.", derived=True)
    train_micro_batch_size_per_gpu: Optional[int] = opt(None, "Sequences per forward/backward per rank.",
                                                        derived=True)
    gradient_accumulation_steps: Optional[int] = opt(None, "Micro-batches accumulated per optimizer step.",
                                                     derived=True)
    gradient_clipping: float = opt(0.0, "Clip the global gradient norm to this value (0 = off). `clip_grad` is an "
                                        "alias.")
    seed: int = opt(1234, "Random seed (model init, data order, dropout).")
    eval_interval: int = opt(1000, "Run validation every N iterations.")
    eval_iters: int = opt(100, "Validation batches per evaluation.")
    do_test: bool = opt(True, "Evaluate on the test split after training.")
    precision: str = opt("fp32", "fp32 | fp16 | bf16. Derived from the DeepSpeed `fp16` / `bf16` blocks (their "
                                 "`enabled`); setting it alone creates the block. Copied to model.precision.",
                         derived=True)
    fp16: Optional[dict] = opt(None, "DeepSpeed fp16 block (enabled, loss_scale, initial_scale_power, "
                                     "loss_scale_window, hysteresis, min_loss_scale), passed through. GPT-NeoX's "
                                     "inner `fp16: true` is folded into `enabled` (DeepSpeed rejects it).")
    bf16: Optional[dict] = opt(None, "DeepSpeed bf16 block ({enabled: true}), passed through.")
    zero_optimization: dict = opt({"stage": 0}, "DeepSpeed ZeRO block (stage 0-3, bucket sizes, overlap_comm, ...), "
                                                "passed through (a spelled-out `cpu_offload: false` is dropped). CPU/NVMe offload is not "
                                                "supported yet.")
    zero_stage: int = opt(0, "ZeRO stage, derived from zero_optimization.stage.", derived=True)
    eod_mask_loss: bool = opt(False, "Do not compute the loss on end-of-document tokens.")
    device: str = opt("auto", "auto | cpu | cuda. auto = cuda when available, else cpu.")
    eval_tasks: Optional[list] = opt(None, "lm_eval task names for eval.py (a list; a string is split at commas). "
                                           "On the command line: `--eval_tasks lambada_openai piqa`.")
    eval_num_fewshot: Optional[int] = opt(None, "eval.py: few-shot examples per prompt (lm_eval num_fewshot); None = "
                                                "each task's own default.")
    eval_limit: Optional[int] = opt(None, "eval.py: evaluate only the first N documents of each task (lm_eval "
                                          "limit); None = all documents.")
    eval_results_prefix: str = opt("", "eval.py: results go to `<prefix>_eval_results.json` (folders in the prefix "
                                       "are created); empty = `eval_results_<date-time>.json` in the current "
                                       "directory.")
    eval_include_path: Optional[str] = opt(None, "eval.py: folder of extra lm_eval task YAMLs (lm_eval "
                                                 "include_path), e.g. `eval_tasks/` for local JSONL tasks; its tasks "
                                                 "are added to lm_eval's built-in ones.")
    eval_batch_size: Optional[int] = opt(None, "eval.py: sequences per forward on each data-parallel rank (None = "
                                               "train_micro_batch_size_per_gpu).")
    eval_bootstrap_iters: int = opt(100000, "eval.py: bootstrap resamples for the stderr of non-mean metrics "
                                            "(lm_eval bootstrap_iters; 0 = no stderr for those).")
    eval_log_samples: bool = opt(False, "eval.py: also write every document's requests and responses to "
                                        "`<results stem>_samples_<task>.jsonl`.")
    batch_inputs: list = field(default_factory=list, compare=False, repr=False,
                               metadata={"help": "Which batch keys the user gave (internal).", "internal": True})


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "Directory to save checkpoints to (None = never save).")
    load: Optional[str] = opt(None, "Directory to resume from (None = start from scratch).")
    checkpoint_factor: Optional[int] = opt(None, "Save every N iterations (with checkpoint_scale linear).")
    extra_save_iters: Optional[list] = opt(None, "Additional iterations to save at, e.g. [0, 1, 2, 4, ..., 512].")
    keep_last_n_checkpoints: Optional[int] = opt(None, "Delete older checkpoints, keeping the last N (None = keep all).")
    no_load_optim: bool = opt(False, "Resume weights only, not the optimizer state.")
    no_load_rng: bool = opt(False, "Do not restore RNG states when resuming.")
    finetune: bool = opt(False, "Load weights only and restart the iteration count at 0 (implies no_load_optim).")
    iteration: Optional[int] = opt(None, "Which checkpoint under `load` eval.py, generate.py and the converters read "
                                         "(`global_stepN`); None = the one `latest` names. Training resumes from "
                                         "`latest` only and refuses this key (point `load` at a `global_stepN` "
                                         "folder instead).")
    checkpoint_scale: str = opt("linear", "Save schedule: linear (every checkpoint_factor iterations). "
                                          "Only linear is supported.")


@dataclass
class LoggingConfig:
    log_interval: int = opt(100, "Print/log training metrics every N iterations.")
    log_dir: Optional[str] = opt(None, "Where text logs go. None -> `<save>/logs` when `save` is set, else console "
                                       "only.", derived=True)
    tensorboard_dir: Optional[str] = opt(None, "TensorBoard event folder (None = no TensorBoard).")
    use_wandb: bool = opt(False, "Log to Weights & Biases.")
    wandb_project: Optional[str] = opt(None, "W&B project.")
    wandb_group: Optional[str] = opt(None, "W&B group (runs of one experiment).")
    wandb_team: Optional[str] = opt(None, "W&B entity/team.")
    wandb_run_name: Optional[str] = opt(None, "W&B run name (None = generated).")
    wandb_mode: Optional[str] = opt(None, "None | online | offline | disabled (None = the WANDB_MODE environment "
                                          "variable, else online).")
    steps_per_print: int = opt(10, "DeepSpeed: print its own progress line every N steps.")
    wall_clock_breakdown: bool = opt(False, "DeepSpeed: time forward/backward/step separately.")
    log_grad_norm: bool = opt(True, "Log the global gradient norm.")
    peak_flops: Optional[float] = opt(None, "Peak FLOP/s of one device, for the MFU column (None = no MFU).")
    log_memory: bool = opt(True, "Log peak memory per interval.")


@dataclass
class ParallelConfig:
    pipe_parallel_size: int = opt(1, "Pipeline stages (GPT-NeoX meaning): 0 or 1 = the plain DeepSpeed engine, N >= "
                                     "2 = DeepSpeed's pipeline engine with N stages (ZeRO 0 or 1, at least one "
                                     "layer per stage).")
    model_parallel_size: int = opt(1, "Tensor-parallel size: attention heads, KV heads and the MLP width must divide "
                                      "by it; the padded vocabulary is a multiple of make_vocab_size_divisible_by x "
                                      "this.")
    sequence_parallel: bool = opt(False, "Megatron sequence parallelism (with model_parallel_size): norms / dropout "
                                         "run on seq_length / TP tokens; seq_length must divide by TP.")
    world_size: Optional[int] = opt(None, "Total ranks. Derived: the launch's ranks (deepy.py: hostfile slots, "
                                          "num_gpus, else visible GPUs; train.py: WORLD_SIZE), else num_nodes x "
                                          "num_gpus, else num_gpus, else model_parallel_size x pipe stages. Given "
                                          "explicitly it must equal the launch's.", derived=True)
    data_parallel_size: Optional[int] = opt(None, "Derived: world_size / (model_parallel_size x pipeline stages).",
                                            derived=True)
    distributed_backend: Optional[str] = opt(None, "nccl | gloo. None/auto: nccl with CUDA, gloo on CPU; nccl on a "
                                                   "CPU-only run is switched to gloo (logged).", derived=True)


@dataclass
class LauncherConfig:
    hostfile: Optional[str] = opt(None, "DeepSpeed hostfile (`host slots=N` lines) for multi-node launches.")
    include: Optional[str] = opt(None, "DeepSpeed --include host/GPU filter, e.g. `worker-0:0,1@worker-1`.")
    exclude: Optional[str] = opt(None, "DeepSpeed --exclude host/GPU filter.")
    num_nodes: int = opt(-1, "Nodes to use from the hostfile (-1 = all).")
    num_gpus: Optional[int] = opt(None, "Processes (devices) per node (None = all visible GPUs, 1 on CPU). Not "
                                        "more than the visible CUDA devices; on a machine without CUDA, N CPU "
                                        "processes over gloo.")
    master_port: int = opt(29500, "Rendezvous port.")
    master_addr: Optional[str] = opt(None, "Rendezvous address (None = first host / localhost).")
    launcher: str = opt("pdsh", "Multi-node runner: pdsh | openmpi | mvapich | slurm.")
    deepspeed_slurm: bool = opt(False, "Launch with srun, reading ranks from SLURM variables.")
    deepspeed_mpi: bool = opt(False, "Discover ranks from MPI (mpirun launched).")
    comment: Optional[str] = opt(None, "Passed to srun --comment (slurm launcher).")
    no_ssh: bool = opt(False, "Start each node's processes locally without ssh (DeepSpeed --no_ssh; run once per "
                              "node with --node_rank).")
    no_ssh_check: bool = opt(False, "Skip the passwordless-ssh check before a multi-node launch.")
    node_rank: int = opt(-1, "With no_ssh: which hostfile node this invocation starts (0-based; run deepy once per "
                             "node). -1 = unset.")
    force_multi: bool = opt(False, "Use the multi-node runner even for one node.")
    env: dict = opt({}, "Extra environment variables forwarded to every rank.")
