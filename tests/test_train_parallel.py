"""Tensor / pipeline / data parallelism through the real training loop (``pretrain``) on 2 gloo CPU processes.

Every multi-process run is compared with a one-process run of the same config on the same global batch: the
per-iteration losses must agree to 1e-5 (SepLLM attention, so the separator plan must reach every rank and stage).
Data-parallel runs also match the logged gradient norms and the trained weights: Adam and clipping hide a constant
gradient scale (a sum instead of a mean over ranks) from the losses, not from the norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron.config import ConfigError
from megatron.training import pretrain
from megatron.config.layout import pipeline_engine_stages
from parallel_spawn import run_distributed
from sep_helpers import make_sepllm_cfg
from train_helpers import (WEIGHT_CHECK_ADAM_EPS, logged_grad_norms, make_tiny_corpus, pretrain_with_weights,
                           tiny_config, update_mismatch)

ITERS = 3
ZERO1 = {"training__zero_optimization": {"stage": 1}, "training__zero_stage": 1}
EVAL = {"training__eval_interval": 2, "training__eval_iters": 2, "training__do_test": True}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pg19_dir, neox_tokenizer_file):
    out = tmp_path_factory.mktemp("corpus")
    return make_tiny_corpus(out, sorted(pg19_dir.glob("*.txt"))[0], neox_tokenizer_file)


def _cfg(corpus: str, tokenizer: Path, run_dir: Path, **overrides):
    cfg = tiny_config(corpus, tokenizer, run_dir, train_iters=ITERS, **overrides)
    cfg.sepllm = make_sepllm_cfg(num_layers=cfg.model.num_layers, window=8)
    # GPT-NeoX pads the vocabulary to a multiple of 128 x TP: pin it so every layout starts from the same weights
    cfg.model.padded_vocab_size = 50432
    return cfg


def _losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}


def _train_rank(rank: int, world_size: int, cfg) -> None:
    pretrain(cfg)


def _assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, ITERS + 1))
    for it in want:
        assert abs(got[it] - want[it]) <= 1e-5, (it, got[it], want[it])


def test_pipe_parallel_size_meaning():
    assert [pipeline_engine_stages(v) for v in (None, 0, 1, 2, 4)] == [0, 0, 0, 2, 4]
    with pytest.raises(ConfigError, match="pipe_parallel_size = -1"):
        pipeline_engine_stages(-1)


def test_world_size_not_divisible_by_tp_times_pp_fails_before_any_work(corpus, neox_tokenizer_file, tmp_path):
    cfg = _cfg(corpus, neox_tokenizer_file, tmp_path, parallel__model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"world size 1 is not divisible by model_parallel_size x pipe stages = "
                                          r"2 x 1 = 2"):
        pretrain(cfg)
    assert not (tmp_path / "logs").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["tp2", "tp2_sp", "pp2", "pp2_zero0"])
def test_two_rank_tp_and_pp_runs_match_one_process(mode, corpus, neox_tokenizer_file, tmp_path):
    """TP=2 (with and without sequence parallelism) and PP=2 with a SepLLM config, ZeRO-1 (and PP=2 with ZeRO-0,
    whose clipping DeepSpeed's pipeline engine once did with the first stage's norm only): same training,
    validation and test losses and gradient norms as the one-process run; the checkpoints hold TP shards / gathered
    stage weights."""
    ref = pretrain(_cfg(corpus, neox_tokenizer_file, tmp_path / "ref", **ZERO1, **EVAL,
                        checkpoint__save=str(tmp_path / "ref" / "ckpt"), checkpoint__checkpoint_factor=2,
                        checkpoint__extra_save_iters=[0]))
    par = {"tp2": {"parallel__model_parallel_size": 2},
           "tp2_sp": {"parallel__model_parallel_size": 2, "parallel__sequence_parallel": True},
           "pp2": {"parallel__pipe_parallel_size": 2},
           "pp2_zero0": {"parallel__pipe_parallel_size": 2}}[mode]
    zero = {"training__zero_optimization": {"stage": 0}, "training__zero_stage": 0} if mode == "pp2_zero0" else ZERO1
    run = tmp_path / mode
    cfg = _cfg(corpus, neox_tokenizer_file, run, **zero, **EVAL, checkpoint__save=str(run / "ckpt"),
               checkpoint__checkpoint_factor=2, checkpoint__extra_save_iters=[0], **par)
    run_distributed(_train_rank, 2, cfg, timeout=180)
    _assert_close(_losses(run / "logs"), ref.train_losses)
    _assert_norms_close(logged_grad_norms(run / "logs"), logged_grad_norms(tmp_path / "ref" / "logs"))
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    valid = {r["iteration"]: r["valid_lm_loss"] for r in rows if "valid_lm_loss" in r}
    test = [r["test_lm_loss"] for r in rows if "test_lm_loss" in r]
    assert sorted(valid) == sorted(ref.valid_losses) == [2] and len(test) == 1
    assert abs(valid[2] - ref.valid_losses[2]) <= 1e-5 and abs(test[0] - ref.test_loss) <= 1e-5
    # the checkpoints hold TP shards (reshard.py's layout) / the gathered pipeline weights: the initial ones merge
    # to exactly the reference's
    assert sorted(p.name for p in (run / "ckpt").glob("global_step*")) == ["global_step0", "global_step2",
                                                                          "global_step3"]
    step0 = run / "ckpt" / "global_step0"
    files = sorted(p.name for p in step0.glob("*model_states.pt"))
    assert files == (["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"] if mode.startswith("tp")
                     else ["model_states.pt"])
    import torch

    from megatron.parallel.reshard import merge_tp_state_dicts

    shards = [torch.load(step0 / f, weights_only=True) for f in files]
    merged = merge_tp_state_dicts(shards) if len(shards) > 1 else shards[0]
    plain = torch.load(tmp_path / "ref" / "ckpt" / "global_step0" / "model_states.pt", weights_only=True)
    assert set(merged) == set(plain)
    for k in plain:
        torch.testing.assert_close(merged[k], plain[k], atol=0, rtol=0, msg=k)


def _zero_cfg(corpus: str, tokenizer: Path, run_dir: Path, stage: int, micro: int, **overrides):
    return _cfg(corpus, tokenizer, run_dir, micro=micro, training__zero_optimization={"stage": stage},
                training__zero_stage=stage, **overrides)


def _train_zero_stages(rank: int, world_size: int, cfgs: list) -> None:
    for cfg in cfgs:  # one spawn for all stages: process start-up dominates these tiny runs
        pretrain(cfg)


def _train_keep_weights(rank: int, world_size: int, cfgs: list) -> None:
    """Like ``_train_zero_stages``; rank 0 also writes the initial and trained weights to
    ``<log_dir>/../weights.pt``."""
    import torch

    for cfg in cfgs:
        _, initial, trained = pretrain_with_weights(cfg)
        if rank == 0:
            torch.save({"initial": initial, "trained": trained}, Path(cfg.logging.log_dir).parent / "weights.pt")


def _assert_norms_close(got: dict[int, float], want: dict[int, float]) -> None:
    # DeepSpeed's ZeRO and our ZeRO-0 clipping both sum squares in fp64: they agree far below 1e-6 (the fp32 sum
    # once reported a norm 5e-6 (tiny run) to 1.3e-4 (tiny-cpu.yml) lower and clipped with it)
    assert sorted(got) == sorted(want) == list(range(1, ITERS + 1))
    for it in want:
        assert got[it] == pytest.approx(want[it], rel=1e-6, abs=0), (it, got[it], want[it])


@pytest.mark.distributed
def test_data_parallel_zero_0_to_3_matches_one_process_with_double_micro_batch(corpus, neox_tokenizer_file,
                                                                               tmp_path):
    """DP=2 with micro-batch 1 == one process with micro-batch 2 (same global batch) for ZeRO 0, 1, 2, 3, SepLLM:
    losses, logged gradient norms and trained weights."""
    import torch

    eps = {"optimizer__eps": WEIGHT_CHECK_ADAM_EPS}
    ref, ref_initial, ref_trained = pretrain_with_weights(_zero_cfg(corpus, neox_tokenizer_file, tmp_path / "ref", 0,
                                                                    micro=2, **eps))
    ref_norms = logged_grad_norms(tmp_path / "ref" / "logs")
    assert all(n > 0.0 for n in ref_norms.values())
    cfgs = [_zero_cfg(corpus, neox_tokenizer_file, tmp_path / f"z{stage}", stage, micro=1, **eps)
            for stage in range(4)]
    run_distributed(_train_keep_weights, 2, cfgs, timeout=240)
    for stage in range(4):
        run = tmp_path / f"z{stage}"
        rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["consumed_samples"] == 2 * ITERS
        _assert_close(_losses(run / "logs"), ref.train_losses)
        _assert_norms_close(logged_grad_norms(run / "logs"), ref_norms)
        weights = torch.load(run / "weights.pt", weights_only=True)
        for name, w0 in ref_initial.items():
            torch.testing.assert_close(weights["initial"][name], w0, rtol=0, atol=0, msg=name)
        mismatch = update_mismatch(ref_initial, weights["trained"], ref_trained)
        assert max(mismatch.values()) <= 5e-5, (stage, mismatch)  # measured <= 5e-7


@pytest.mark.distributed
def test_dp2_checkpoint_resumes_with_dp1_on_the_same_loss_curve(corpus, neox_tokenizer_file, tmp_path):
    """A ZeRO-0 DP=2 (micro 1) run saved after iteration 2 continues under DP=1 (micro 2) on the remaining samples
    with the loss and gradient norm of an uninterrupted DP=1 run."""
    ref = pretrain(_zero_cfg(corpus, neox_tokenizer_file, tmp_path / "ref", 0, micro=2)).train_losses
    dp2 = tmp_path / "dp2"
    cfg = _zero_cfg(corpus, neox_tokenizer_file, dp2, 0, micro=1, checkpoint__save=str(dp2 / "ckpt"),
                    checkpoint__extra_save_iters=[2])
    run_distributed(_train_zero_stages, 2, [cfg], timeout=180)
    resumed = pretrain(_zero_cfg(corpus, neox_tokenizer_file, tmp_path / "dp1", 0, micro=2,
                                 checkpoint__load=str(dp2 / "ckpt" / "global_step2")))
    assert sorted(resumed.train_losses) == [3]
    assert abs(resumed.train_losses[3] - ref[3]) <= 1e-5, (resumed.train_losses, ref)
    assert logged_grad_norms(tmp_path / "dp1" / "logs")[3] == pytest.approx(
        logged_grad_norms(tmp_path / "ref" / "logs")[3], rel=1e-6, abs=0)


@pytest.mark.distributed
def test_checkpoints_load_across_tensor_parallel_sizes(corpus, neox_tokenizer_file, tmp_path):
    """A TP=1 checkpoint loads into a TP=2 run and the TP=2 shards load into a TP=1 run (weights only, no_load_optim,
    and with the optimizer state): all continue with the losses of the TP=1 run from the same weights."""
    ref_dir = tmp_path / "ref"
    ref = pretrain(_cfg(corpus, neox_tokenizer_file, ref_dir, **ZERO1, checkpoint__save=str(ref_dir / "ckpt"),
                        checkpoint__extra_save_iters=[0])).train_losses
    tp_dir = tmp_path / "tp2"
    cfg = _cfg(corpus, neox_tokenizer_file, tp_dir, **ZERO1, parallel__model_parallel_size=2,
               checkpoint__load=str(ref_dir / "ckpt" / "global_step0"), checkpoint__no_load_optim=True,
               checkpoint__save=str(tp_dir / "ckpt"), checkpoint__extra_save_iters=[0])
    run_distributed(_train_rank, 2, cfg, timeout=180)
    _assert_close(_losses(tp_dir / "logs"), ref)
    back = pretrain(_cfg(corpus, neox_tokenizer_file, tmp_path / "back", **ZERO1,
                         checkpoint__load=str(tp_dir / "ckpt" / "global_step0"), checkpoint__no_load_optim=True))
    _assert_close(back.train_losses, ref)
    # with the optimizer state too: converted from the checkpoint's layout-free copy (tests/test_resume_layouts.py)
    strict = pretrain(_cfg(corpus, neox_tokenizer_file, tmp_path / "strict", **ZERO1,
                           checkpoint__load=str(tp_dir / "ckpt" / "global_step0")))
    _assert_close(strict.train_losses, ref)
