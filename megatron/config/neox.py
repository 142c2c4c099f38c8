"""The top-level resolved config: one typed object per component, plus serialisation and the DeepSpeed JSON view."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron.config.components import (
    CheckpointConfig,
    DataConfig,
    LauncherConfig,
    LoggingConfig,
    LRScheduleConfig,
    OptimizerConfig,
    ParallelConfig,
    TokenizerConfig,
    TrainingConfig,
)
from megatron.config.derived import resolve_given_batch
from megatron.config.errors import ConfigError
from megatron.config.generation import GenerationConfig
from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig

# Attribute name -> dataclass, in the order sections are written out.
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sepllm": SepLLMConfig,
    "optimizer": OptimizerConfig,
    "lr_schedule": LRScheduleConfig,
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "parallel": ParallelConfig,
    "launcher": LauncherConfig,
    "generation": GenerationConfig,
}


DERIVED_KEYS_KEY = "derived_keys"
# Values only validation computes: a config may repeat them (a saved resolved config does), never change them.
READ_ONLY_FIELDS = frozenset({
    ("sepllm", "mode"), ("sepllm", "prefill_windows"), ("sepllm", "generate_windows"), ("training", "zero_stage"),
    ("parallel", "data_parallel_size"), ("model", "precision"), ("model", "mlp_widths"), ("model", "gelu_approximate")})


def derivable_fields() -> frozenset:
    """(section, field) of every value validation computes when the user does not give it."""
    marked = {(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if f.metadata.get("derived")}
    return frozenset(marked) | READ_ONLY_FIELDS


@dataclass
class NeoXConfig:
    """Everything a run needs, validated. Build it with ``megatron.config.load_config``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sepllm: SepLLMConfig = field(default_factory=SepLLMConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    deepspeed_extra: dict = field(default_factory=dict)
    sources: list = field(default_factory=list, compare=False)
    overrides: list = field(default_factory=list, compare=False)
    # "section.field" of every value a source set (not serialised, not compared): lets consumers tell an explicit
    # setting from a default. None = unknown (a config built in code): every value then counts as set on purpose.
    explicit_keys: Optional[frozenset] = field(default=None, compare=False, repr=False)
    # "section.field" -> where the value came from ("run.yml", "command line --train-iters=5"), for messages
    key_sources: dict = field(default_factory=dict, compare=False, repr=False)

    def source_of(self, key: str) -> str:
        """Where ``"section.field"`` was set: its file or command-line override, else the config's files."""
        return self.key_sources.get(key) or ", ".join(self.sources) or "config"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Resolved config as plain data, one block per component; ``load_config`` reads it back to an equal object."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {
                f.name: copy.deepcopy(getattr(section, f.name))
                for f in dataclasses.fields(section)
                if not f.metadata.get("internal")
            }
        # ``params`` repeats the typed optimizer fields; write only the other arguments so the block reads back.
        typed = set(out["optimizer"]) - {"type", "params"}
        out["optimizer"]["params"] = {k: v for k, v in out["optimizer"]["params"].items() if k not in typed}
        explicit = self.explicit_keys
        if self.sepllm.Layer_num is not None and explicit is not None and "model.num_layers" not in explicit:
            # A training-free SepLLM block sized by Layer_num: writing the default num_layers would make the
            # reloaded config contradict Layer_num (see docs/config_reference.md, "Layer_num and num_layers").
            del out["model"]["num_layers"]
        for key, value in self.deepspeed_extra.items():
            out[key] = copy.deepcopy(value)
        # Values computed from other keys are written (so the file shows what ran) but listed here, and loading
        # recomputes them: a later `--train-iters` still moves lr_decay_iters/warmup_iters, a pinned global batch
        # stays pinned, and the distributed backend follows the machine.
        recompute = set(READ_ONLY_FIELDS) | {(s, n) for s, n in derivable_fields()
                                             if explicit is not None and f"{s}.{n}" not in explicit}
        if self.model.padded_vocab_size is not None:
            # filled in from the tokenizer by the trainer (validation cannot derive it): a saved resolved config
            # must reload to the same model, so the value is kept rather than recomputed
            recompute.discard(("model", "padded_vocab_size"))
        out[DERIVED_KEYS_KEY] = sorted(f"{s}.{n}" for s, n in recompute)
        return out

    def to_yaml(self) -> str:
        """``to_dict`` as YAML, headed by comments naming the merged files and overrides."""
        import yaml

        header = ["# Resolved SepLLM-NeoX config (python -m megatron.config). Keys listed in derived_keys were computed",
                  "# from the others and are recomputed when this file is loaded."]
        header += [f"# source: {s}" for s in self.sources]
        header += [f"# override: {o}" for o in self.overrides]
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)
        return "\n".join(header) + "\n" + body

    # ------------------------------------------------------------------ DeepSpeed
    def deepspeed_config(self, data_parallel_size: int, client_optimizer: bool = False) -> dict:
        """The DeepSpeed JSON config for ``data_parallel_size`` ranks.

        Validation resolved the batch triple for the launched data-parallel size; for that size it is used as is.
        For another size (a config built or validated for different ranks) the batch keys the user gave are resolved
        again (``derived.resolve_given_batch``): a given global batch is kept or refused with a ConfigError, never
        scaled; a global batch derived from micro x accumulation follows the ranks (GPT-NeoX).
        ``client_optimizer=True`` leaves out the optimizer block (the trainer passes a torch optimizer, the right
        choice on CPU where DeepSpeed's Adam needs a JIT build).
        """
        t = self.training
        if data_parallel_size == self.parallel.data_parallel_size:
            global_bs, micro, accum = (t.train_batch_size, t.train_micro_batch_size_per_gpu,
                                       t.gradient_accumulation_steps)
        else:
            try:
                global_bs, micro, accum = resolve_given_batch(
                    t.batch_inputs, t.train_batch_size, t.train_micro_batch_size_per_gpu, t.gradient_accumulation_steps,
                    data_parallel_size)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (this run has data-parallel size {data_parallel_size}; the config was "
                                  f"resolved for {self.parallel.data_parallel_size})") from None
        ds: dict[str, Any] = {
            "train_batch_size": global_bs,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
        }
        if not client_optimizer:
            ds["optimizer"] = {"type": self.optimizer.type, "params": copy.deepcopy(self.optimizer.params)}
        if t.fp16 is not None:
            ds["fp16"] = copy.deepcopy(t.fp16)
        if t.bf16 is not None:
            ds["bf16"] = copy.deepcopy(t.bf16)
        ds["zero_optimization"] = copy.deepcopy(t.zero_optimization)
        ds["gradient_clipping"] = t.gradient_clipping
        ds["steps_per_print"] = self.logging.steps_per_print
        ds["wall_clock_breakdown"] = self.logging.wall_clock_breakdown
        for key, value in self.deepspeed_extra.items():
            ds[key] = copy.deepcopy(value)
        if t.fp32_allreduce:  # GPT-NeoX's key: DeepSpeed all-reduces the gradients in fp32
            ds["communication_data_type"] = "fp32"
        return ds


__all__ = ["NeoXConfig", "SECTIONS", "ConfigError"]
