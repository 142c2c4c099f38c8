"""Data pipeline: Megatron ``.bin/.idx`` files, text -> tokens preprocessing, GPT samples, blending, samplers.

Exports are resolved lazily so that the preprocessing CLIs start without importing torch.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "blendable_dataset": ("BlendableDataset",),
    "errors": ("CorpusError", "CorpusFetchError", "DataError", "IndexedDatasetError", "PrepareError"),
    "gpt_dataset": ("GPTDataset",),
    "indexed_dataset": ("MMapIndexedDataset", "MMapIndexedDatasetBuilder", "best_dtype", "merge_datasets"),
    "preprocess": ("PrepareResult", "tokenize_to_indexed"),
    "samplers": ("PretrainingSampler",),
    "data_utils": ("build_train_valid_test_datasets", "parse_split", "split_document_ranges"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
