"""Atomic checkpoints: crash safety, pruning, clear errors for bad paths, corrupt files and mismatched models,
and ZeRO-1 / bf16 optimizer state round trips through DeepSpeed engines wrapping a toy module."""

from __future__ import annotations

import os

import pytest
import torch

from megatron.checkpoint.format import CheckpointError
from megatron.training import checkpointing as ckpt
from megatron.training.checkpointing import RunSnapshot, load_checkpoint, save_checkpoint, should_save
from megatron.training.distributed import init_distributed
from megatron.training.optimizer import build_optimizer, param_groups


class Toy(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, width)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


class _Opt:
    type, lr, betas, eps, momentum, weight_decay, params = "AdamW", 1e-2, [0.9, 0.95], 1e-8, 0.0, 0.1, {}


def _engine(width: int = 8, zero: int = 0, bf16: bool = False, seed: int = 0):
    from megatron.training.engine import build_engine

    init_distributed("cpu")
    torch.manual_seed(seed)
    model = Toy(width)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9}
    return build_engine(model, build_optimizer(model, _Opt()), ds, "cpu")


def _train(engine, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(engine.module.parameters()).dtype
    losses = []
    for _ in range(steps):
        x = torch.randn(2, 8, generator=gen).to(dtype)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _save(engine, root, it, keep_last_n=None, **snapshot):
    return save_checkpoint(root, engine, RunSnapshot(iteration=it, **snapshot), rank=0, world_size=1,
                           keep_last_n=keep_last_n)


def test_should_save_rule():
    assert [i for i in range(1, 13) if should_save(i, 5, [1, 2])] == [1, 2, 5, 10]
    assert not should_save(3, None, None)


def test_param_groups_skip_norms_and_biases():
    groups = {g["name"]: g for g in param_groups(Toy(), 0.1)}
    decay = groups["decay"]["params"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay) and len(decay) == 2  # the two Linear weights only
    assert len(groups["no_decay"]["params"]) == 4               # 2 biases + LayerNorm weight and bias


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    engine = _engine()
    _train(engine, 2)
    _save(engine, tmp_path, 2)
    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
    _train(engine, 2)

    real_replace = os.replace

    class Crash(BaseException):
        """The process dying between writing and renaming (an OSError there is cleaned up instead: see
        tests/test_bad_input_runtime.py)."""

    def crash(src, dst):
        if os.path.basename(str(dst)).startswith("global_step"):
            raise Crash("simulated crash between writing and renaming")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(Crash, match="simulated crash"):
        _save(engine, tmp_path, 4)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)

    assert (tmp_path / "latest").read_text().strip() == "global_step2"
    assert not (tmp_path / "global_step4").exists()
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the half-written folder is left aside
    fresh = _engine(seed=5)
    meta = load_checkpoint(tmp_path, fresh, rank=0, world_size=1)
    assert meta["iteration"] == 2
    for key, value in fresh.module.state_dict().items():
        assert torch.equal(value, saved[key])

    _save(engine, tmp_path, 6)  # the next good save cleans the leftovers
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_keep_last_n_and_resave_same_iteration(tmp_path):
    engine = _engine()
    for it in (1, 2, 3, 4):
        _save(engine, tmp_path, it, keep_last_n=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step3", "global_step4"]
    _save(engine, tmp_path, 4, keep_last_n=2)  # overwrite in place is also atomic
    assert (tmp_path / "latest").read_text().strip() == "global_step4"


def test_resume_restores_optimizer_and_rng_exactly(tmp_path):
    a = _engine()
    _train(a, 3)
    torch.manual_seed(77)
    _save(a, tmp_path, 3)
    expected_rng = torch.rand(3)
    expected = _train(a, 3, seed=9)

    b = _engine(seed=123)
    load_checkpoint(tmp_path, b, rank=0, world_size=1)
    assert torch.equal(torch.rand(3), expected_rng)
    assert _train(b, 3, seed=9) == expected


@pytest.mark.parametrize("zero, bf16", [(1, False), (0, True), (2, True)])
def test_zero_and_bf16_optimizer_states_round_trip(tmp_path, zero, bf16):
    a = _engine(zero=zero, bf16=bf16)
    _train(a, 3)
    _save(a, tmp_path, 3)
    expected = _train(a, 3, seed=9)
    b = _engine(zero=zero, bf16=bf16, seed=42)
    load_checkpoint(tmp_path, b, rank=0, world_size=1)
    assert _train(b, 3, seed=9) == expected


def test_missing_and_empty_paths_are_named(tmp_path):
    engine = _engine()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist"):
        load_checkpoint(tmp_path / "nope", engine, rank=0, world_size=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"no checkpoint found in {tmp_path / 'empty'}"):
        load_checkpoint(tmp_path / "empty", engine, rank=0, world_size=1)
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "latest").write_text("global_step9\n")
    with pytest.raises(CheckpointError, match="global_step9.*not a complete checkpoint"):
        load_checkpoint(tmp_path / "dangling", engine, rank=0, world_size=1)


@pytest.mark.parametrize("victim", ["model_states.pt", "optim_rank0.pt", "rng_rank0.pt", "meta.json"])
def test_corrupt_files_are_named(tmp_path, victim):
    engine = _engine()
    path = _save(engine, tmp_path, 1)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path / victim}.*corrupt"):
        load_checkpoint(tmp_path, engine, rank=0, world_size=1)


def test_missing_file_is_named(tmp_path):
    engine = _engine()
    path = _save(engine, tmp_path, 1)
    (path / "optim_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=f"{path / 'optim_rank0.pt'} is missing"):
        load_checkpoint(tmp_path, engine, rank=0, world_size=1)


def test_model_shape_mismatch_names_the_keys(tmp_path):
    _save(_engine(width=8), tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"inp\.weight: checkpoint \(8, 8\) vs model \(16, 8\)"):
        load_checkpoint(tmp_path, _engine(width=16), rank=0, world_size=1)


def test_checkpoint_files_need_no_pickle(tmp_path):
    path = _save(_engine(zero=1), tmp_path, 1, config_yaml="a: 1\n")
    for name in ("model_states.pt", "optim_rank0.pt", "rng_rank0.pt"):
        torch.load(path / name, weights_only=True)  # would raise on any non-allowlisted object
    assert (path / "config.yml").read_text() == "a: 1\n"
