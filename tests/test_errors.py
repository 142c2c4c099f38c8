"""The error family: every expected failure sits under one root, on the branch that gives its exit code."""

from __future__ import annotations

import io

import pytest

from megatron.errors import NeoxError, RunError, UserInputError, report_error


def test_classes_sit_on_the_right_branch_and_keep_their_builtin_base() -> None:
    from megatron.config import ConfigError
    from megatron.data.errors import DataError
    from megatron.inference.cli import UsageError
    from megatron.parallel.mesh import ParallelLayoutError
    from megatron.tokenizer import TokenizerError
    from megatron.checkpoint.format import CheckpointError
    from megatron.training.lr_schedules import LRScheduleError
    from megatron.training.preflight import OutputPathError

    from megatron.data.errors import CorpusFetchError
    from megatron.training.checkpointing import CheckpointSaveError
    from megatron.training.data_setup import DataSetupError
    from megatron.training.steppers import TrainingError

    # what the user named cannot be used: a key, a flag, a data prefix, a checkpoint to read, a tokenizer
    for cls in (ConfigError, UsageError, ParallelLayoutError, LRScheduleError, OutputPathError, CheckpointError,
                DataError, DataSetupError, TokenizerError):
        assert issubclass(cls, UserInputError) and not issubclass(cls, RunError) and cls.exit_code == 2, cls
    # the run failed after its inputs were accepted
    for cls in (CheckpointSaveError, TrainingError, CorpusFetchError):
        assert issubclass(cls, RunError) and cls.exit_code == 1, cls
    assert issubclass(LRScheduleError, ValueError) and issubclass(CheckpointError, RuntimeError)
    from megatron.sepllm.attention.auto_table import AutoTableError
    from megatron.sepllm.attention.checks import SepAttentionConfigError
    from megatron.sepllm.hf.trainingfree import SepLLMRuntimeError

    assert issubclass(SepAttentionConfigError, UserInputError) and issubclass(SepAttentionConfigError, ValueError)
    assert issubclass(AutoTableError, UserInputError) and issubclass(AutoTableError, ValueError)
    assert issubclass(SepLLMRuntimeError, RunError) and issubclass(SepLLMRuntimeError, RuntimeError)


@pytest.mark.parametrize("rank, world, exc, printed, code", [
    ("0", "1", UserInputError("bad key"), "tool: error: bad key\n", 2),
    ("1", "2", UserInputError("bad key"), "", 2),                       # rank 0 says it for everyone
    ("1", "2", RunError("disk full"), "tool: error: rank 1: disk full\n", 1),
    ("0", "1", ValueError("plain"), "tool: error: plain\n", 1),
])
def test_report_error_prints_once_per_failure(monkeypatch, rank, world, exc, printed, code) -> None:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    out = io.StringIO()
    assert report_error(exc, "tool", stream=out) == code
    assert out.getvalue() == printed


def test_report_error_overrides(monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = io.StringIO()
    assert report_error(RunError("no ckpt"), input_kinds=(RunError,), stream=out) == 2
    assert report_error(UserInputError("x"), exit_code=1, stream=out) == 1
    assert out.getvalue() == "error: no ckpt\nerror: x\n"
    assert issubclass(UserInputError, NeoxError) and issubclass(RunError, NeoxError)
