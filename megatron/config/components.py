"""Small typed config objects, one per component (optimizer, schedule, data, ...).

Field names are the GPT-NeoX / DeepSpeed key names with ``-`` written as ``_``; every field carries a ``help`` text in
its metadata, from which ``docs/config_reference.md`` is generated. Fields marked ``derived`` are computed by
validation (``megatron/config/_loading/validate.py``); setting them in YAML is allowed only with the value validation
derives. A key with a fixed set of values is typed with its ``Literal`` (``megatron.config.derived``,
``megatron.device``), the one list of its choices.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron.config.derived import (CheckpointScale, CompileBackend, DataImpl, DistributedBackend, Launcher,
                                     LRDecayStyle, OptimizerType, PackImpl, Precision, TokenizerType, WandbMode, WSDDecayStyle)
from megatron.config.preference import DatasetImpl, TrainImpl
from megatron.device import Device


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with a documented default (mutable defaults are copied per instance)."""
    metadata = {"help": help, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class OptimizerConfig:
    type: OptimizerType = opt("Adam", "Optimizer (GPT-NeoX `optimizer.type`, case-insensitive): Adam (decoupled weight "
                                      "decay, as GPT-NeoX's FusedAdam in its default adam_w_mode; `params.adam_w_mode: "
                                      "false` gives L2-style Adam) | AdamW (ours, the same as Adam) | Lion (GPT-NeoX's "
                                      "Lion: sign of the interpolated momentum, decoupled weight decay, betas default "
                                      "[0.9, 0.99]) | SGD (momentum, L2 weight decay) | cpu_adam (DeepSpeed's "
                                      "DeepSpeedCPUAdam, JIT-built on first use; CPU runs only, ZeRO offload is not "
                                      "built; `cpu_torch_adam` is the same, as in GPT-NeoX). onebitadam, sm3, "
                                      "madgrad_wd and DeepSpeed's other types are refused.")
    lr: float = opt(1.0e-3, "Peak learning rate (`optimizer.params.lr`; GPT-NeoX's default 0.001). A top-level `lr` "
                            "key also lands here.")
    betas: Optional[list] = opt(None, "[beta1, beta2] (`optimizer.params.betas`); None = the optimizer's own default: "
                                      "[0.9, 0.999] for Adam/AdamW/cpu_adam, [0.9, 0.99] for Lion.", derived=True)
    eps: float = opt(1.0e-8, "Adam(W) / cpu_adam epsilon (`optimizer.params.eps`).")
    momentum: float = opt(0.0, "SGD momentum (`optimizer.params.momentum`).")
    weight_decay: float = opt(0.1, "Weight decay of the matrices (biases and norm weights never decay). GPT-NeoX "
                                   "top-level `weight-decay` (default 0.1) and `optimizer.params.weight_decay` both "
                                   "map here.")
    params: dict = opt({}, "The whole resolved `optimizer.params` block: lr, betas, eps, weight_decay and the other "
                           "arguments the type accepts (Adam/AdamW: adam_w_mode, bias_correction: true, amsgrad: "
                           "false, torch_adam, set_grad_none; SGD: dampening, nesterov; cpu_adam: adamw_mode, "
                           "bias_correction, amsgrad: false, fp32_optimizer_states); any other key is refused.")


@dataclass
class LRScheduleConfig:
    lr_decay_style: LRDecayStyle = opt("linear", "Learning-rate decay after warmup, GPT-NeoX AnnealingLR formulas on "
                                                 "the count n of optimizer steps taken so far (T = lr_decay_iters - "
                                                 "warmup_iters, t = n - warmup_iters): constant (lr) | linear (lr x (T "
                                                 "- t) / T) | cosine (min_lr + (lr - min_lr) / 2 x (1 + cos(pi t / "
                                                 "T)); rises again past lr_decay_iters, as in GPT-NeoX) | exponential "
                                                 "(lr x exp(-0.693 t / T): halves over T) | wsd (ours: "
                                                 "warmup-stable-decay, see wsd_decay_fraction). Every style is floored "
                                                 "at min_lr.")
    lr_decay_iters: Optional[int] = opt(None, "Iterations over which the rate decays (None -> floor(train_iters x "
                                              "lr_decay_fraction) when that is set, else train_iters; at least 1).",
                                        derived=True)
    lr_decay_fraction: Optional[float] = opt(None, "GPT-NeoX: decay over floor(fraction x train_iters) iterations "
                                                   "(useful with train_epochs); give it or lr_decay_iters, not both.")
    min_lr: float = opt(0.0, "Floor of the decayed learning rate.")
    decay_lr_to: Optional[float] = opt(None, "Spelling of the Llemma GPT-NeoX release: min_lr = decay_lr_to x lr (the "
                                             "peak rate). Give it or min_lr, not both.")
    warmup: float = opt(0.01, "Linear warmup length as a FRACTION of lr_decay_iters (GPT-NeoX meaning); the step "
                              "count is warmup x lr_decay_iters, unrounded as in GPT-NeoX.")
    warmup_iters: Optional[float] = opt(None, "Warmup in iterations (ours); derived as warmup x lr_decay_iters "
                                              "(may be fractional, as GPT-NeoX computes it) unless `warmup-iters` is "
                                              "given. During warmup lr = lr x max(1, n) / warmup_iters.",
                                        derived=True)
    override_lr_scheduler: bool = opt(False, "GPT-NeoX: on resume take lr, min_lr, warmup, lr_decay_iters and the "
                                             "decay style from this config, and only the step count from the "
                                             "checkpoint.")
    use_checkpoint_lr_scheduler: bool = opt(False, "GPT-NeoX: on resume take lr, min_lr, warmup, lr_decay_iters and "
                                                   "the decay style from the checkpoint, ignoring this config. With "
                                                   "neither key a resume whose schedule values differ from the "
                                                   "checkpoint's stops with one line naming them (GPT-NeoX asserts).")
    wsd_decay_fraction: float = opt(0.1, "lr_decay_style wsd (ours; GPT-NeoX has no WSD): the last fraction of the "
                                         "post-warmup span (lr_decay_iters - warmup_iters) that decays from lr to "
                                         "min_lr; before it the rate stays at lr; after lr_decay_iters it is min_lr.")
    wsd_decay_style: WSDDecayStyle = opt("linear", "lr_decay_style wsd (ours): shape of the decay phase, p from 0 to "
                                                   "1: linear (1 - p) | cosine ((1 + cos(pi p)) / 2) | 1-sqrt (1 - "
                                                   "sqrt(p)), scaling lr - min_lr above min_lr.")


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
    train_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: fine-tuning label datasets, one per "
                                                       "train_data_paths entry (`<prefix>_label_document` from "
                                                       "prepare_data.py --sft): a row aligned with the text row (not "
                                                       "shifted yet), -100 where no loss is counted (prompt, "
                                                       "system / user turns, padding). docs/finetuning.md.")
    valid_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of valid_data_paths (one each).")
    test_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of test_data_paths (one each).")
    pack_impl: PackImpl = opt("packed", "GPT-NeoX: how documents become samples of seq_length + 1 tokens. packed: "
                                        "documents stitched back to back into full windows (pre-training); "
                                        "pack_until_overflow: whole documents packed into a sample until the next "
                                        "would overflow, the rest padded; unpacked: one document per sample, "
                                        "padded. Padding is token 0 with label -100 (never counted).")
    allow_chopped: bool = opt(True, "GPT-NeoX: with pack_impl pack_until_overflow / unpacked, a document longer "
                                    "than seq_length + 1 tokens is cut to its first seq_length + 1 tokens; false "
                                    "drops it (the count is logged). Ignored by pack_impl packed.")
    split: str = opt("969, 30, 1", "train, valid, test proportions of `data_path` (comma-separated).")
    data_impl: DataImpl = opt("infer", "Indexed dataset implementation (GPT-NeoX): infer (read the .idx header) | mmap "
                                  "(Megatron MMIDIDX); both read MMIDIDX files, the only format written here. "
                                  "GPT-NeoX's legacy 'cached' format is refused.")
    num_workers: int = opt(2, "DataLoader worker processes per rank.")
    mmap_warmup: bool = opt(False, "Touch every page of the memory-mapped data once at start-up.")
    weight_by_num_documents: bool = opt(False, "Blend datasets by document count (weights ~ n_docs^alpha) instead of "
                                               "the given weights.")
    weighted_sampler_alpha: float = opt(1.0, "Exponent alpha of weight_by_num_documents.")
    data_cache_dir: Optional[str] = opt(None, "Where index maps (doc/sample/shuffle .npy) are cached; None = next to "
                                              "the data.")
    use_shared_fs: bool = opt(True, "True: the data folder is shared by all nodes, only global rank 0 builds index "
                                    "maps; False: local rank 0 of every node builds them.")

    dataset_impl: Optional[DatasetImpl] = opt(None, "GPT-NeoX: gpt2 (language-model samples from the *_data_paths) | "
                                                    "pairwise (one chosen / rejected pair per sample from the pos_ / "
                                                    "neg_ paths, each padded to seq_length + 1; pack_impl is not "
                                                    "read). Derived from train_impl (dpo: pairwise, else gpt2); "
                                                    "'online' is refused.", derived=True)
    pos_train_data_paths: Optional[list] = opt(None, "GPT-NeoX (train_impl dpo): prefixes of the CHOSEN training "
                                                     "documents, one document per preference pair.")
    neg_train_data_paths: Optional[list] = opt(None, "GPT-NeoX (train_impl dpo): prefixes of the REJECTED training "
                                                     "documents, one per pos_train_data_paths entry, document i "
                                                     "pairing with document i of it.")
    pos_train_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of pos_train_data_paths (one "
                                                           "each; -100 on the prompt, so only the response counts). "
                                                           "None = every token of the chosen document counts.")
    neg_train_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of neg_train_data_paths (one "
                                                           "each); given together with pos_train_label_data_paths.")
    pos_valid_data_paths: Optional[list] = opt(None, "GPT-NeoX (train_impl dpo): prefixes of the CHOSEN validation "
                                                     "documents, one document per preference pair.")
    neg_valid_data_paths: Optional[list] = opt(None, "GPT-NeoX (train_impl dpo): prefixes of the REJECTED validation "
                                                     "documents, one per pos_valid_data_paths entry, document i "
                                                     "pairing with document i of it.")
    pos_valid_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of pos_valid_data_paths (one "
                                                           "each; -100 on the prompt, so only the response counts). "
                                                           "None = every token of the chosen document counts.")
    neg_valid_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of neg_valid_data_paths (one "
                                                           "each); given together with pos_valid_label_data_paths.")
    pos_test_data_paths: Optional[list] = opt(None, "GPT-NeoX (train_impl dpo): prefixes of the CHOSEN test "
                                                     "documents, one document per preference pair.")
    neg_test_data_paths: Optional[list] = opt(None, "GPT-NeoX (train_impl dpo): prefixes of the REJECTED test "
                                                     "documents, one per pos_test_data_paths entry, document i "
                                                     "pairing with document i of it.")
    pos_test_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of pos_test_data_paths (one "
                                                           "each; -100 on the prompt, so only the response counts). "
                                                           "None = every token of the chosen document counts.")
    neg_test_label_data_paths: Optional[list] = opt(None, "GPT-NeoX: label datasets of neg_test_data_paths (one "
                                                           "each); given together with pos_test_label_data_paths.")


@dataclass
class TokenizerConfig:
    tokenizer_type: TokenizerType = opt("GPT2BPETokenizer", "HFTokenizer | HFGPT2Tokenizer | GPT2BPETokenizer | "
                                                            "SPMTokenizer | CharLevelTokenizer.")
    vocab_file: Optional[str] = opt(None, "Tokenizer file: HF `tokenizer.json` (HFTokenizer), GPT-2 `vocab.json` "
                                          "(GPT2BPETokenizer), SentencePiece model (SPMTokenizer).")
    merge_file: Optional[str] = opt(None, "GPT-2 BPE `merges.txt` (GPT2BPETokenizer only).")


@dataclass
class TrainingConfig:
    train_iters: Optional[int] = opt(None, "Number of optimizer steps to train (this or train_epochs is required for "
                                           "training).")
    train_epochs: Optional[int] = opt(None, "GPT-NeoX: train for this many passes over the training split instead "
                                            "of train_iters: train_iters = (micro-batches of one epoch per data-"
                                            "parallel rank x epochs) // gradient_accumulation_steps, the epoch being "
                                            "all samples of the train split (one pass, shuffled once) cut to whole "
                                            "global micro-batches; later epochs repeat the first one's order. Not "
                                            "with train_iters, weight_by_num_documents or unequal "
                                            "train_data_weights.")
    exit_interval: Optional[int] = opt(None, "GPT-NeoX: stop (exit 0) after the first iteration divisible by this "
                                             "value, once that iteration's checkpoint and validation are done; no "
                                             "extra checkpoint, no final save or test evaluation (pair it with "
                                             "checkpoint_factor).")
    fp32_allreduce: bool = opt(False, "GPT-NeoX: gradients are all-reduced in fp32 across data-parallel ranks "
                                      "(DeepSpeed `communication_data_type: fp32`) and tensor-parallel reductions "
                                      "run in fp32, cast back to the activation dtype.")
    train_batch_size: Optional[int] = opt(None, "Global batch = micro x grad-accum x data-parallel size. Give any two "
                                                "of the three batch keys; all three must be consistent.", derived=True)
    train_micro_batch_size_per_gpu: Optional[int] = opt(None, "Sequences per forward/backward per rank.",
                                                        derived=True)
    gradient_accumulation_steps: Optional[int] = opt(None, "Micro-batches accumulated per optimizer step.",
                                                     derived=True)
    gradient_clipping: float = opt(1.0, "Clip the global gradient norm to this value (0 = off); GPT-NeoX's default "
                                        "1.0. `clip_grad` is an alias.")
    seed: int = opt(1234, "Random seed (model init, data order, dropout).")
    eval_interval: int = opt(1000, "Run validation every N iterations.")
    eval_iters: int = opt(100, "Validation batches per evaluation.")
    do_test: bool = opt(True, "Evaluate on the test split after training.")
    precision: Precision = opt("fp32", "fp32 | fp16 | bf16. Derived from the DeepSpeed `fp16` / `bf16` blocks (their "
                                 "`enabled`); setting it alone creates the block. Copied to model.precision.",
                         derived=True)
    fp16: Optional[dict] = opt(None, "DeepSpeed fp16 block (enabled, loss_scale, initial_scale_power, "
                                     "loss_scale_window, hysteresis, min_loss_scale), passed through. GPT-NeoX's "
                                     "inner `fp16: true` is folded into `enabled` (DeepSpeed rejects it).")
    bf16: Optional[dict] = opt(None, "DeepSpeed bf16 block ({enabled: true}), passed through.")
    zero_optimization: dict = opt({"stage": 0}, "DeepSpeed ZeRO block (stage 0-3, bucket sizes, overlap_comm, ...), "
                                                "passed through (a spelled-out `cpu_offload: false` is dropped). "
                                                "CPU/NVMe offload is not supported yet.")
    zero_stage: int = opt(0, "ZeRO stage, derived from zero_optimization.stage.", derived=True)
    eod_mask_loss: bool = opt(False, "Do not compute the loss on end-of-document tokens.")
    reset_position_ids: bool = opt(False, "Megatron/GPT-NeoX: positions (rotary, ALiBi, learned, BiPE) restart at 0 on "
                                          "the token after each end-of-document token of a packed sample.")
    reset_attention_mask: bool = opt(False, "Megatron/GPT-NeoX: no token attends across an end-of-document token of "
                                            "a packed sample. With SepLLM the keep rule is per document: each "
                                            "document has its own initial tokens and separators, and the window "
                                            "stops at its first token (docs/finetuning.md).")
    compile: bool = opt(False, "torchtitan: torch.compile each transformer block for training (graph reused across "
                               "blocks; state_dict keys unchanged) and the plain loss; the first step's time, which "
                               "includes compiling, is logged. A block that cannot compile: one warning, eager "
                               "blocks (megatron/model/compile.py).")
    compile_backend: CompileBackend = opt("inductor", "torchtitan's compile.backend: inductor (generated kernels, the "
                                                      "fast one) | aot_eager (traces and runs the same graphs "
                                                      "without generated code: checks that a layout compiles, in "
                                                      "seconds) | eager (dynamo tracing only).")
    device: Device = opt("auto", "auto | cpu | cuda. auto = cuda when available, else cpu.")
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
    train_impl: TrainImpl = opt("normal", "GPT-NeoX: normal (language-model loss) | dpo (Direct Preference "
                                          "Optimization on chosen / rejected pairs, docs/finetuning.md). GPT-NeoX's "
                                          "kto, rm and reinforce are refused (not built).")
    dpo_beta: float = opt(0.1, "GPT-NeoX: DPO's beta, the strength of the implicit KL penalty: loss = -logsigmoid("
                               "beta x ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))), pi / ref = summed "
                               "log-probabilities of the counted tokens under the trained / reference model.")
    dpo_fp32: bool = opt(True, "GPT-NeoX: compute DPO's log-softmax in fp32 (logits upcast); false keeps the "
                               "activation dtype (bf16 / fp16 runs).")
    dpo_reference_free: bool = opt(False, "GPT-NeoX: DPO without a reference model (ref log-probabilities = 0).")
    precompute_model_name: Optional[str] = opt(None, "GPT-NeoX (train_impl dpo): read the reference log-probabilities "
                                                     "from float32 datasets `<pos/neg prefix>_<name>` (one value per "
                                                     "token, aligned with the labels) instead of running a frozen "
                                                     "reference model.")
    batch_inputs: list = field(default_factory=list, compare=False, repr=False,
                               metadata={"help": "Which batch keys the user gave (internal).", "internal": True})


@dataclass
class CheckpointConfig:
    save: Optional[str] = opt(None, "Directory to save checkpoints to (None = never save).")
    load: Optional[str] = opt(None, "Directory to resume from (None = start from scratch).")
    checkpoint_factor: Optional[int] = opt(None, "Save every N iterations (with checkpoint_scale linear).")
    extra_save_iters: Optional[list] = opt(None, "Additional iterations to save at, e.g. [0, 1, 2, 4, ..., 512].")
    keep_last_n_checkpoints: Optional[int] = opt(None, "Delete older checkpoints, keeping the last N (None = keep "
                                                       "all).")
    no_load_optim: bool = opt(False, "Resume weights only, not the optimizer state.")
    no_load_rng: bool = opt(False, "Do not restore RNG states when resuming.")
    no_save_optim: bool = opt(False, "Write checkpoints without optimizer state (weights, RNG, counters only); "
                                     "resuming one then needs no_load_optim. GPT-NeoX declares this key but never "
                                     "reads it.")
    no_save_rng: bool = opt(False, "GPT-NeoX: write checkpoints without RNG states; resuming one then needs "
                                   "no_load_rng.")
    finetune: bool = opt(False, "Load weights only and restart the iteration count at 0 (implies no_load_optim).")
    iteration: Optional[int] = opt(None, "Which checkpoint under `load` eval.py, generate.py and the converters read "
                                         "(`global_stepN`); None = the one `latest` names. Training resumes from "
                                         "`latest` only and refuses this key (point `load` at a `global_stepN` "
                                         "folder instead).")
    checkpoint_scale: CheckpointScale = opt("linear", "Save schedule: linear (every checkpoint_factor iterations). "
                                          "Only linear is supported.")
    overwrite_save: bool = opt(False, "Start a new run into a `save` folder that holds another run's checkpoints: "
                                      "they are deleted at start (like Hugging Face's overwrite_output_dir). Without "
                                      "it such a run resumes the folder (load unset, same model shape) or stops.")
    checkpoint_async: bool = opt(False, "Write checkpoints in a background thread: the state is copied to host memory "
                                        "at the save iteration and training continues while it is written (same "
                                        "temp folder + rename + `latest`); the next save and the end of the run "
                                        "wait for it.")


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
    wandb_mode: Optional[WandbMode] = opt(None, "None | online | offline | disabled (None = the WANDB_MODE environment "
                                          "variable, else online).")
    wandb_host: Optional[str] = opt(None, "URL of the W&B server (GPT-NeoX `wandb_host`), passed to wandb as its "
                                          "base_url; None = wandb's own (WANDB_BASE_URL, else https://api.wandb.ai).")
    wandb_init_all_ranks: bool = opt(False, "GPT-NeoX: start a W&B run on every rank (same project and group, run "
                                            "name suffixed -rank<R>); the other ranks log their own per-parameter "
                                            "rows (log_param_norm, log_grad_pct_zeros, log_grad_norm), rank 0 "
                                            "everything.")
    use_comet: bool = opt(False, "GPT-NeoX: log to Comet (comet_ml.start; offline with COMET_START_ONLINE=false). "
                                 "comet_ml is not a dependency: without it the run stops with one line.")
    comet_workspace: Optional[str] = opt(None, "Comet workspace (None = your default).")
    comet_project: Optional[str] = opt(None, "Comet project (None = Uncategorized Experiments).")
    comet_experiment_name: Optional[str] = opt(None, "Comet experiment name (None = generated).")
    comet_tags: Optional[list] = opt(None, "Tags added to the Comet experiment.")
    comet_others: Optional[dict] = opt(None, "Extra metadata logged to the Comet experiment (log_others).")
    steps_per_print: int = opt(10, "DeepSpeed: print its own progress line every N steps.")
    wall_clock_breakdown: bool = opt(False, "DeepSpeed: time forward/backward/step separately.")
    log_grad_norm: bool = opt(False, "GPT-NeoX: every iteration, the L2 norm of each parameter's gradient as "
                                     "`gradient_norms/<name>`, read after the data-parallel reduction and before "
                                     "clipping, of the whole parameter (tensor-parallel shards summed over the TP "
                                     "group, ZeRO partitions gathered). The global norm is logged in every training "
                                     "row as `grad_norm` regardless.")
    log_param_norm: bool = opt(False, "GPT-NeoX: every iteration, the L2 norm of each (whole) parameter as "
                                      "`parameter_norms/<name>` (rows of their own in metrics.jsonl, TensorBoard "
                                      "tags as named).")
    log_grad_pct_zeros: bool = opt(False, "GPT-NeoX: every iteration, the percentage (0-100) of exactly-zero "
                                          "gradient entries of each parameter as `pct_grad_zeros/<name>`.")
    log_optimizer_states: bool = opt(False, "GPT-NeoX: every iteration, the L2 norm of every optimizer state tensor "
                                            "(e.g. exp_avg, exp_avg_sq) as `optimizer_state_norms/<index>_<state>`, "
                                            "index = the parameter's position in the optimizer's state dict (under "
                                            "ZeRO-1/2 rank 0's flat partition per group, under ZeRO-3 rank 0's "
                                            "partitions in the order the optimizer created them).")
    log_gradient_noise_scale: bool = opt(False, "GPT-NeoX: estimate the gradient noise scale B_simple (arXiv "
                                                "1812.06162) from the step gradient (B_small = train_batch_size) "
                                                "and its mean over gradient_noise_scale_n_batches steps (B_big), "
                                                "EMA 0.99 with bias correction; logged as `noise_scale` once "
                                                "available. ZeRO stage 0 and no pipeline engine only (GPT-NeoX "
                                                "refuses ZeRO >= 1 too).")
    gradient_noise_scale_n_batches: int = opt(5, "Steps whose gradients are averaged for B_big.")
    gradient_noise_scale_cpu_offload: bool = opt(False, "Keep the gradient-noise-scale buffer in CPU memory.")
    profile: bool = opt(False, "GPT-NeoX: torch.profiler trace of training steps profile_step_start+1 .. "
                               "profile_step_stop (1-based; GPT-NeoX's schedule: wait profile_step_start steps, warm "
                               "up 1, record the rest), written to <log_dir>/profile/ (without a log_dir: "
                               "tensorboard_dir, GPT-NeoX's place) as a Chrome/TensorBoard trace "
                               "(*.pt.trace.json, open in chrome://tracing, Perfetto or TensorBoard's profiler) plus "
                               "NVTX ranges and cudaProfilerStart/Stop on CUDA for nsys.")
    profile_step_start: int = opt(10, "GPT-NeoX: steps of this run (resumed runs count from their first step) "
                                      "before the profiler's warm-up step.")
    profile_step_stop: int = opt(12, "GPT-NeoX: the step after which profiling stops (> profile_step_start).")
    memory_profiling: bool = opt(False, "GPT-NeoX: record CUDA allocator history from model set-up and write the "
                                        "snapshot `mem_snapshot.pickle` (open at pytorch.org/memory_viz) into "
                                        "memory_profiling_path after each iteration profile_step_start+1 .. "
                                        "profile_step_stop+1 (1-based, counted from the start of training as "
                                        "GPT-NeoX does; each overwrites the last). On a CPU run: one log line, "
                                        "nothing recorded.")
    memory_profiling_path: Optional[str] = opt(None, "Folder for the CUDA memory snapshot (required with "
                                                     "memory_profiling).")
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
    distributed_backend: Optional[DistributedBackend] = opt(None, "nccl | gloo. None/auto: nccl with CUDA, gloo on "
                                                                  "CPU; nccl on a CPU-only run is switched to gloo "
                                                                  "(logged).", derived=True)


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
    launcher: Launcher = opt("pdsh", "Multi-node runner: pdsh | openmpi | mvapich | slurm.")
    deepspeed_slurm: bool = opt(False, "Launch with srun, reading ranks from SLURM variables.")
    deepspeed_mpi: bool = opt(False, "Discover ranks from MPI (mpirun launched).")
    comment: Optional[str] = opt(None, "Passed to srun --comment (slurm launcher).")
    account: Optional[str] = opt(None, "Passed to srun --account (slurm launcher), as GPT-NeoX does.")
    no_ssh: bool = opt(False, "Start each node's processes locally without ssh (DeepSpeed --no_ssh; run once per "
                              "node with --node_rank).")
    no_ssh_check: bool = opt(False, "Skip the passwordless-ssh check before a multi-node launch.")
    node_rank: int = opt(-1, "With no_ssh: which hostfile node this invocation starts (0-based; run deepy once per "
                             "node). -1 = unset.")
    force_multi: bool = opt(False, "Use the multi-node runner even for one node.")
    env: dict = opt({}, "Extra environment variables forwarded to every rank.")
