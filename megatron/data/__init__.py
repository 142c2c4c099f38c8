"""Data pipeline: Megatron ``.bin/.idx`` files, text -> tokens preprocessing, GPT samples, blending, samplers."""

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.data_utils import build_train_valid_test_datasets, parse_split, split_document_ranges
from megatron.data.errors import CorpusError, DataError, IndexedDatasetError, PrepareError
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype, merge_datasets
from megatron.data.preprocess import PrepareResult, tokenize_to_indexed
from megatron.data.samplers import PretrainingSampler

__all__ = [
    "BlendableDataset",
    "CorpusError",
    "DataError",
    "GPTDataset",
    "IndexedDatasetError",
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "PrepareError",
    "PrepareResult",
    "PretrainingSampler",
    "best_dtype",
    "build_train_valid_test_datasets",
    "merge_datasets",
    "parse_split",
    "split_document_ranges",
    "tokenize_to_indexed",
]
