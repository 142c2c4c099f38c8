"""Preference training keys (GPT-NeoX's post-training: ``train_impl``, ``dataset_impl``, ``dpo_*``,
``precompute_model_name``, ``pos_/neg_*_data_paths``): their choices and the checks that tie them together.

GPT-NeoX's names and meanings are kept, so a GPT-NeoX DPO config (post-training/configs/llama3-8b-dpo.yml) loads
unchanged. KTO, reward models, REINFORCE and online data are GPT-NeoX modes that are not built here: naming one fails
at config load, in one line.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, get_args

from megatron.config.errors import ConfigError

TrainImpl = Literal["normal", "dpo"]
DatasetImpl = Literal["gpt2", "pairwise"]
TRAIN_IMPLS: tuple[str, ...] = get_args(TrainImpl)
DATASET_IMPLS: tuple[str, ...] = get_args(DatasetImpl)
#: GPT-NeoX values that select a mode not built here -> what it is
NOT_BUILT_TRAIN_IMPLS: dict[str, str] = {
    "kto": "KTO (GPT-NeoX's per-sample desirable/undesirable rewards)",
    "rm": "reward-model training (GPT-NeoX's scalar value head on pairwise data)",
    "reinforce": "REINFORCE (GPT-NeoX's online policy-gradient training)",
}
NOT_BUILT_DATASET_IMPLS: dict[str, str] = {"online": "online data served by a data server (REINFORCE)"}
SPLITS = ("train", "valid", "test")


def pair_keys(split: str) -> tuple[str, str, str, str]:
    """The four DataConfig keys of one split: pos / neg text prefixes and pos / neg label prefixes."""
    return (f"pos_{split}_data_paths", f"neg_{split}_data_paths", f"pos_{split}_label_data_paths",
            f"neg_{split}_label_data_paths")


def pair_prefixes(data: Any, labels: bool = False) -> list[str]:
    """Every pos / neg TEXT prefix the config names (``labels``: every pos / neg LABEL prefix instead; label
    prefixes hold -100 and are not token data)."""
    out: list[str] = []
    for split in SPLITS:
        pos, neg, pos_label, neg_label = pair_keys(split)
        for key in ((pos_label, neg_label) if labels else (pos, neg)):
            out += list(getattr(data, key) or [])
    return out


def check_preference(training: Any, data: Any, parallel: Any, model: Any,
                     where: Callable[[str], str]) -> None:
    """Resolve ``dataset_impl`` and refuse inconsistent preference keys, each in one line naming the key."""
    impl = _built_choice("train_impl", training.train_impl, TRAIN_IMPLS, NOT_BUILT_TRAIN_IMPLS, where)
    training.train_impl = impl
    data.dataset_impl = _dataset_impl(data.dataset_impl, impl, where)
    if not training.dpo_beta > 0:
        raise ConfigError(f"{where('dpo_beta')}: key 'dpo_beta': expected a value > 0, got {training.dpo_beta!r}")
    if impl != "dpo":
        _refuse_dpo_only_keys(training, data, where)
        return
    if training.dpo_reference_free and training.precompute_model_name:
        raise ConfigError(f"{where('precompute_model_name')}: precompute_model_name={training.precompute_model_name!r}"
                          f" names precomputed reference log-probabilities, but dpo_reference_free drops the "
                          f"reference: give one of them")
    for key, value in (("data_path", data.data_path), *((f"{s}_data_paths", getattr(data, f"{s}_data_paths"))
                                                       for s in SPLITS)):
        if value:
            raise ConfigError(f"{where(key)}: {key} is language-model data; train_impl dpo reads chosen / rejected "
                              f"pairs from pos_*_data_paths and neg_*_data_paths: remove {key}")
    if not data.pos_train_data_paths or not data.neg_train_data_paths:
        missing = "pos_train_data_paths" if not data.pos_train_data_paths else "neg_train_data_paths"
        raise ConfigError(f"{where('train_impl')}: train_impl dpo needs pos_train_data_paths (chosen) and "
                          f"neg_train_data_paths (rejected), one prefix each per dataset; {missing} is not set")
    for split in SPLITS:
        _check_split(data, split, where)
    if parallel.pipe_parallel_size >= 2:
        raise ConfigError(f"{where('pipe_parallel_size')}: pipe_parallel_size={parallel.pipe_parallel_size} with "
                          f"train_impl dpo: the pipeline engine has no DPO step (GPT-NeoX refuses it too); use "
                          f"pipe_parallel_size 0 or 1 (data and tensor parallelism and ZeRO 0-2 work)")
    reference_model = not (training.dpo_reference_free or training.precompute_model_name)
    if int(training.zero_stage or 0) >= 3 and reference_model:
        raise ConfigError(f"{where('zero_optimization')}: ZeRO stage 3 with train_impl dpo and a reference model: the "
                          f"frozen reference copy of partitioned weights is not built; use ZeRO stage 0-2, "
                          f"precompute_model_name or dpo_reference_free")
    if training.compile and reference_model:
        raise ConfigError(f"{where('compile')}: compile with train_impl dpo and a reference model: the reference copy "
                          f"of compiled blocks is not built; set compile false, or use precompute_model_name or "
                          f"dpo_reference_free")
    if getattr(data, "pack_impl", None) == "pack_until_overflow":
        raise ConfigError(f"{where('pack_impl')}: pack_impl pack_until_overflow with train_impl dpo: a preference "
                          f"sample holds one chosen / rejected pair (GPT-NeoX's unpacked); set pack_impl unpacked")
    if model.fused_cross_entropy:
        raise ConfigError(f"{where('fused_cross_entropy')}: fused_cross_entropy computes the language-model loss "
                          f"without logits; train_impl dpo needs per-token log-probabilities: set it false")


def _built_choice(key: str, value: Any, built: tuple[str, ...], not_built: dict[str, str],
                  where: Callable[[str], str]) -> str:
    """``value`` of ``key`` lower-cased, refused in one line when it names a GPT-NeoX mode not built here (what it
    is, what to use) or no known mode."""
    choice = str(value).strip().lower()
    if choice in not_built:
        raise ConfigError(f"{where(key)}: {key}: {choice} is not built; {not_built[choice]} is a GPT-NeoX mode with "
                          f"no implementation here: use {key} {' or '.join(built)}")
    if choice not in built:
        raise ConfigError(f"{where(key)}: key '{key}': expected one of {', '.join(built)}, got {value!r}")
    return choice


def _dataset_impl(value: Optional[str], impl: str, where: Callable[[str], str]) -> str:
    wanted = "pairwise" if impl == "dpo" else "gpt2"
    if value is None:
        return wanted
    value = _built_choice("dataset_impl", value, DATASET_IMPLS, NOT_BUILT_DATASET_IMPLS, where)
    if value != wanted:
        raise ConfigError(f"{where('dataset_impl')}: dataset_impl {value} does not fit train_impl {impl} (which reads "
                          f"{wanted} data); set dataset_impl {wanted} or leave it out")
    return value


def _refuse_dpo_only_keys(training: Any, data: Any, where: Callable[[str], str]) -> None:
    if training.precompute_model_name:
        raise ConfigError(f"{where('precompute_model_name')}: precompute_model_name is read only with train_impl dpo "
                          f"(precomputed reference log-probabilities); remove it or set train_impl dpo")
    for split in SPLITS:
        for key in pair_keys(split):
            if getattr(data, key):
                raise ConfigError(f"{where(key)}: {key} holds preference pairs, read only with train_impl dpo; "
                                  f"set train_impl dpo or remove {key}")


def _check_split(data: Any, split: str, where: Callable[[str], str]) -> None:
    pos, neg, pos_label, neg_label = (getattr(data, k) or [] for k in pair_keys(split))
    kpos, kneg, kpos_label, kneg_label = pair_keys(split)
    if len(pos) != len(neg):
        raise ConfigError(f"{where(kneg if neg else kpos)}: {kpos} has {len(pos)} prefixes but {kneg} has "
                          f"{len(neg)}; every chosen dataset needs its rejected dataset (same documents, same order)")
    if bool(pos_label) != bool(neg_label):
        given, missing = (kpos_label, kneg_label) if pos_label else (kneg_label, kpos_label)
        raise ConfigError(f"{where(given)}: {given} is set but {missing} is not; give label data for both chosen and "
                          f"rejected, or for neither")
    for key, labels in ((kpos_label, pos_label), (kneg_label, neg_label)):
        if labels and len(labels) != len(pos):
            raise ConfigError(f"{where(key)}: {key} has {len(labels)} prefixes but {kpos} has {len(pos)}; one label "
                              f"prefix per data prefix")


__all__ = ["DATASET_IMPLS", "DatasetImpl", "NOT_BUILT_TRAIN_IMPLS", "SPLITS", "TRAIN_IMPLS", "TrainImpl",
           "check_preference", "pair_keys", "pair_prefixes"]
