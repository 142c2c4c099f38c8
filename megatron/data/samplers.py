"""Deterministic, resumable batch sampler for pre-training (Megatron semantics)."""

from __future__ import annotations

from typing import Iterator

from megatron.data.errors import DataError


class PretrainingSampler:
    """Yields this rank's micro-batch of sample indices, walking the global order from ``consumed_samples``.

    Global batch ``b`` is indices ``[consumed + b*M*D, consumed + (b+1)*M*D)`` (M = micro batch, D = data-parallel
    size); rank r takes its r-th slice of M. Because the order is global, resuming with any DP size from the saved
    ``consumed_samples`` continues exactly where training stopped.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise DataError(f"total_samples must be positive, got {total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise DataError(f"consumed_samples must be in [0, {total_samples}), got {consumed_samples}")
        if micro_batch_size <= 0:
            raise DataError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(
                f"data_parallel_rank {data_parallel_rank} invalid for data_parallel_size {data_parallel_size}"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.drop_last = drop_last

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_micro_batch)
        if not self.drop_last and rest > self.data_parallel_rank * self.micro_batch_size:
            full += 1
        return full

    def __iter__(self) -> Iterator[list[int]]:
        step = self.global_micro_batch
        lo = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + step <= self.total_samples:
            yield list(range(start + lo, start + lo + self.micro_batch_size))
            start += step
        if not self.drop_last and start < self.total_samples:
            mine = list(range(start + lo, min(start + lo + self.micro_batch_size, self.total_samples)))
            if mine:
                yield mine
