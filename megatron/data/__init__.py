"""Data pipeline: Megatron ``.bin/.idx`` files, text -> tokens preprocessing, GPT samples, blending, samplers.

Exports are resolved lazily so that the preprocessing CLIs start without importing torch.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "BlendableDataset": "megatron.data.blendable_dataset",
    "CorpusError": "megatron.data.errors",
    "DataError": "megatron.data.errors",
    "IndexedDatasetError": "megatron.data.errors",
    "PrepareError": "megatron.data.errors",
    "GPTDataset": "megatron.data.gpt_dataset",
    "MMapIndexedDataset": "megatron.data.indexed_dataset",
    "MMapIndexedDatasetBuilder": "megatron.data.indexed_dataset",
    "best_dtype": "megatron.data.indexed_dataset",
    "merge_datasets": "megatron.data.indexed_dataset",
    "PrepareResult": "megatron.data.preprocess",
    "tokenize_to_indexed": "megatron.data.preprocess",
    "PretrainingSampler": "megatron.data.samplers",
    "build_train_valid_test_datasets": "megatron.data.data_utils",
    "parse_split": "megatron.data.data_utils",
    "split_document_ranges": "megatron.data.data_utils",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
__all__ = sorted(_LAZY)
