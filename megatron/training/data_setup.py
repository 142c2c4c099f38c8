"""Datasets and resumable data loaders for training, plus auto-preparation of the corpus shipped in the repo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from megatron.config.preference import pair_prefixes
from megatron.errors import UserInputError

if TYPE_CHECKING:
    from megatron.config import DataConfig, TokenizerConfig
    from megatron.config.neox import NeoXConfig


class DataSetupError(UserInputError, RuntimeError):
    """The configured data cannot be found or does not fit the run (missing prefix, empty split): exit 2."""


@dataclass
class SplitDatasets:
    train: Any
    valid: Any
    test: Any


def _exists(prefix: str) -> bool:
    return Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()


def configured_prefixes(data_cfg: DataConfig) -> list[str]:
    """Every ``.bin/.idx`` prefix the config names."""
    prefixes = [data_cfg.data_path] if data_cfg.data_path else []
    for key in ("train_data_paths", "valid_data_paths", "test_data_paths"):
        prefixes += list(getattr(data_cfg, key) or [])
    return prefixes + pair_prefixes(data_cfg)


def label_prefixes(data_cfg: DataConfig) -> list[str]:
    """Every fine-tuning label prefix the config names (``train/valid/test_label_data_paths``)."""
    return [p for key in ("train_label_data_paths", "valid_label_data_paths", "test_label_data_paths")
            for p in (getattr(data_cfg, key) or [])]


def bundled_corpus_for(prefix: str) -> str | None:
    """The shipped corpus a prefix refers to, e.g. ``data/pg19_sample/pg19_sample_text_document`` -> pg19_sample."""
    from megatron.data.corpus_registry import CORPORA

    name = Path(prefix).name
    if not name.endswith("_text_document"):
        return None
    corpus = CORPORA.get(name[: -len("_text_document")])
    return corpus.name if corpus is not None and corpus.local_dir is not None else None


def ensure_data(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig, info: Callable[[str], None],
                may_prepare: bool) -> None:
    """Check the data exists; tokenize a corpus shipped in the repo when its prefix is missing.

    Only rank 0 prepares (``may_prepare``); the caller puts a barrier after this.
    """
    prefixes = configured_prefixes(data_cfg)
    if not prefixes:
        raise DataSetupError("no training data configured: set data-path (or train-data-paths/valid-data-paths)")
    for prefix in dict.fromkeys(label_prefixes(data_cfg)):
        if not _exists(prefix):
            raise DataSetupError(f"label data prefix {prefix!r} not found ({prefix}.bin/.idx missing); write it with "
                                 f"python prepare_data.py <name> --sft --input <jsonl> (docs/finetuning.md)")
    for prefix in dict.fromkeys(pair_prefixes(data_cfg) + pair_prefixes(data_cfg, labels=True)):
        if not _exists(prefix):
            raise DataSetupError(f"preference data prefix {prefix!r} not found ({prefix}.bin/.idx missing); write the "
                                 f"chosen / rejected datasets with python tools/datasets/preprocess_preference_data.py "
                                 f"--input <jsonl> --output-prefix <prefix> (docs/finetuning.md)")
    for prefix in dict.fromkeys(prefixes):
        if _exists(prefix):
            continue
        corpus = bundled_corpus_for(prefix)
        if corpus is None:
            raise DataSetupError(
                f"data prefix {prefix!r} not found ({prefix}.bin/.idx missing); tokenize your text first, e.g. "
                f"python prepare_data.py <name> --input <files> -t {tokenizer_cfg.tokenizer_type} "
                f"-v {tokenizer_cfg.vocab_file} --output-prefix {prefix.removesuffix('_text_document')}")
        if not may_prepare:
            continue
        from megatron.data.corpus_registry import fetch_corpus
        from megatron.data.preprocess import tokenize_to_indexed

        info(f"data {prefix} is missing: tokenizing the bundled corpus {corpus!r} "
             f"(same as: python prepare_data.py {corpus} -t {tokenizer_cfg.tokenizer_type} "
             f"-v {tokenizer_cfg.vocab_file} -d {Path(prefix).parent.parent})")
        source = fetch_corpus(corpus, Path(prefix).parent.parent)
        tokenize_to_indexed(os.fspath(source), prefix.removesuffix("_text_document"),
                            tokenizer_type=tokenizer_cfg.tokenizer_type, vocab_file=tokenizer_cfg.vocab_file,
                            merge_file=tokenizer_cfg.merge_file, append_eod=True, progress=True)


def check_token_ids(data_cfg: DataConfig, vocab_size: int, tokenizer_name: str) -> None:
    """Every token id of every configured dataset must lie in ``[0, vocab_size)`` of the run's tokenizer.

    Data tokenized with another tokenizer otherwise fails mid-run (IndexError in the embedding) or trains silently on
    the wrong rows. Raises ConfigError (a config / input problem, exit 2) naming the data, the id and the vocabulary.
    The min / max are cached next to the data (``megatron.data.token_range``), so only the first start scans it.
    """
    from megatron.config import ConfigError
    from megatron.data.token_range import token_range

    for prefix in dict.fromkeys(configured_prefixes(data_cfg)):
        found = token_range(prefix, cache_dir=data_cfg.data_cache_dir)
        if found.max_id is not None and found.max_id >= vocab_size:
            raise ConfigError(f"data {prefix}: max token id {found.max_id} >= vocabulary size {vocab_size} of the "
                              f"tokenizer ({tokenizer_name}); the data was tokenized with another tokenizer: "
                              f"re-tokenize it or set tokenizer-type / vocab-file to the one it was made with")
        if found.min_id is not None and found.min_id < 0:
            raise ConfigError(f"data {prefix}: negative token id {found.min_id}; the .bin file is not token data")
    for prefix in dict.fromkeys(label_prefixes(data_cfg)):     # labels: token ids, or negative for "not counted"
        found = token_range(prefix, cache_dir=data_cfg.data_cache_dir)
        if found.max_id is not None and found.max_id >= vocab_size:
            raise ConfigError(f"label data {prefix}: max label id {found.max_id} >= vocabulary size {vocab_size} of "
                              f"the tokenizer ({tokenizer_name}); the labels were made with another tokenizer")


def build_datasets(cfg: NeoXConfig, global_batch: int, train_iters: int | None,
                   splits: tuple[bool, bool, bool] = (True, True, True)) -> SplitDatasets:
    """Train/valid/test datasets sized for ``train_iters`` steps and the evaluation schedule (``splits`` picks
    which are built; ``train_iters`` None builds the train split for exactly one pass, see train_epochs).

    Validation always evaluates the same first ``eval_iters`` global batches of the valid split, so valid losses
    are comparable across evaluations and unaffected by resuming.
    """
    from megatron.data.data_utils import build_train_valid_test_datasets

    t, d = cfg.training, cfg.data
    eval_samples = max(t.eval_iters, 0) * global_batch
    wants_valid = train_iters is not None and bool(t.eval_interval) and t.eval_interval <= train_iters
    # one requested sample builds one epoch (the index maps cover whole epochs)
    train_samples = 1 if train_iters is None else train_iters * global_batch
    num_samples = [train_samples if splits[0] else 0, eval_samples if wants_valid and splits[1] else 0,
                   eval_samples if t.do_test and splits[2] else 0]
    if t.train_impl == "dpo":  # chosen / rejected pairs (megatron.data.pairwise_dataset)
        from megatron.training.preference_data import build_preference_datasets

        return SplitDatasets(*build_preference_datasets(cfg, num_samples))
    train, valid, test = build_train_valid_test_datasets(
        data_prefixes=[d.data_path] if d.data_path else None,
        data_weights=None,
        split=d.split,
        seq_length=cfg.model.seq_length,
        seed=t.seed,
        train_valid_test_num_samples=num_samples,
        train_prefixes=d.train_data_paths,
        valid_prefixes=d.valid_data_paths,
        test_prefixes=d.test_data_paths,
        train_weights=d.train_data_weights,
        valid_weights=d.valid_data_weights,
        test_weights=d.test_data_weights,
        cache_dir=d.data_cache_dir,
        train_label_prefixes=d.train_label_data_paths,
        valid_label_prefixes=d.valid_label_data_paths,
        test_label_prefixes=d.test_label_data_paths,
        pack_impl=d.pack_impl,
        allow_chopped=d.allow_chopped,
    )
    return SplitDatasets(train=train, valid=valid, test=test)


def dropped_documents_note(datasets: SplitDatasets) -> str | None:
    """One log line counting the documents a whole-document ``pack_impl`` left out per split (None: none left out)."""
    parts = []
    for name in ("train", "valid", "test"):
        counts = {"too_long": 0, "no_target": 0}
        for part in _parts(getattr(datasets, name)):
            for key, value in getattr(part, "dropped_documents", {}).items():
                counts[key] += value
        if counts["too_long"] or counts["no_target"]:
            parts.append(f"{name}: {counts['too_long']} longer than seq_length + 1 (allow_chopped false), "
                         f"{counts['no_target']} without a counted label")
    return "pack_impl: documents left out: " + "; ".join(parts) if parts else None


def _parts(dataset: Any) -> list[Any]:
    """The GPT datasets behind a split (a blend holds several, an epoch repeater one)."""
    if dataset is None:
        return []
    inner = getattr(dataset, "epoch", None)
    if inner is not None:
        return _parts(inner)
    return list(getattr(dataset, "datasets", None) or [dataset])


class RepeatedEpochs(torch.utils.data.Dataset):
    """``total`` samples walking one epoch over and over: sample ``i`` is ``epoch[i % usable]``.

    GPT-NeoX's ``train_epochs``: the train split is built for one pass, its loader drops the last incomplete global
    micro-batch (``usable`` samples are read per pass) and ``itertools.cycle`` repeats the pass in the same order.
    Indexing instead of cycling keeps resuming exact (the sampler starts at the consumed sample count)."""

    def __init__(self, epoch: Any, usable: int, total: int) -> None:
        if usable <= 0:
            raise DataSetupError(f"train_epochs: one epoch of the train split holds {len(epoch)} samples, fewer than "
                                 f"one global micro-batch")
        self.epoch, self.usable, self.total = epoch, int(usable), int(total)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, idx: int) -> Any:
        if not 0 <= idx < self.total:
            raise IndexError(f"sample {idx} out of range for {self.total} samples")
        return self.epoch[idx % self.usable]


def epoch_train_iters(epoch_samples: int, micro_batch: int, dp_size: int, gas: int, epochs: int) -> int:
    """GPT-NeoX's ``train_iters`` for ``train_epochs``: (micro-batches of one epoch per data-parallel rank x epochs)
    // gradient_accumulation_steps, the loader dropping the last incomplete global micro-batch."""
    return (epoch_samples // (micro_batch * dp_size)) * epochs // gas


def build_epoch_datasets(cfg: NeoXConfig, micro_batch: int, dp_size: int, gas: int) -> tuple[SplitDatasets, int]:
    """Datasets for a ``train_epochs`` run and its train_iters: the train split is built for exactly one pass and
    repeated (:class:`RepeatedEpochs`); validation and test are sized as for a run of that many iterations."""
    one = build_datasets(cfg, micro_batch * dp_size * gas, None, splits=(True, False, False))
    if one.train is None or len(one.train) == 0:
        raise DataSetupError("train_epochs: the training split is empty: check data paths and split")
    epoch_samples = len(one.train)
    train_iters = epoch_train_iters(epoch_samples, micro_batch, dp_size, gas, int(cfg.training.train_epochs))
    if train_iters < 1:
        raise DataSetupError(f"train_epochs={cfg.training.train_epochs}: one epoch of {epoch_samples} samples gives "
                             f"no whole step of {micro_batch * dp_size * gas} samples")
    global_batch = micro_batch * dp_size * gas
    usable = (epoch_samples // (micro_batch * dp_size)) * micro_batch * dp_size
    rest = build_datasets(cfg, global_batch, train_iters, splits=(False, True, True))
    return SplitDatasets(train=RepeatedEpochs(one.train, usable, train_iters * global_batch), valid=rest.valid,
                         test=rest.test), train_iters


def build_loader(dataset: Any, consumed_samples: int, micro_batch: int, dp_rank: int, dp_size: int,
                 num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader | None:
    """A loader whose batch sampler starts after ``consumed_samples`` (what makes a resume continue exactly)."""
    if dataset is None or len(dataset) == 0:
        return None
    from megatron.data.samplers import PretrainingSampler

    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed_samples,
                                 micro_batch_size=micro_batch, data_parallel_rank=dp_rank,
                                 data_parallel_size=dp_size)
    # A private generator: creating a loader iterator draws a worker base seed, and drawing it from the global torch
    # RNG would shift dropout masks after a resume (the iterator is created at a different point of the stream).
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(consumed_samples))
