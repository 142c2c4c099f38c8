"""The training loop on CPU: exact resume, gradient-accumulation equivalence, logging contract, device checks.

Runs happen in-process (a 1-rank gloo group is created once); each run is a 2-layer, hidden-64 model on 32-token
windows of a PG-19 book, a few iterations long.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron.training import pretrain
from megatron.device import DeviceConfigError
from train_helpers import (WEIGHT_CHECK_ADAM_EPS, logged_grad_norms, make_tiny_corpus, pretrain_with_weights,
                           tiny_config, update_mismatch)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pg19_dir, neox_tokenizer_file):
    out = tmp_path_factory.mktemp("corpus")
    return make_tiny_corpus(out, sorted(pg19_dir.glob("*.txt"))[0], neox_tokenizer_file)


def _rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bitwise_exact_and_logs_follow_the_contract(corpus, neox_tokenizer_file, tmp_path):
    full_dir = tmp_path / "full"
    # dropout on, and evaluations (which create data-loader iterators) not aligned with the checkpoint: the RNG
    # stream seen by iteration 4 must still be the one the checkpoint captured
    cfg = tiny_config(corpus, neox_tokenizer_file, full_dir, train_iters=6, checkpoint__save=str(full_dir / "ckpt"),
                      checkpoint__checkpoint_factor=3, training__eval_interval=2, training__do_test=True,
                      logging__tensorboard_dir=str(full_dir / "tb"), model__hidden_dropout=0.1)
    full = pretrain(cfg)
    assert sorted(full.train_losses) == [1, 2, 3, 4, 5, 6]
    assert [Path(p).name for p in full.checkpoints] == ["global_step3", "global_step6"]
    assert (full_dir / "ckpt" / "latest").read_text().strip() == "global_step6"

    rows = _rows(full_dir / "logs")
    train_rows = [r for r in rows if "lm_loss" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert {"iteration", "lm_loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
        assert r["grad_norm"] > 0 and r["tokens_per_sec"] > 0 and r["mfu"] > 0
    assert train_rows[0]["lr"] == pytest.approx(3e-3)  # warmup 1 iteration -> peak at iteration 1
    valid = [r for r in rows if "valid_lm_loss" in r]
    assert [r["iteration"] for r in valid] == [2, 4, 6]
    assert all(math.isfinite(r["valid_lm_loss"]) for r in valid)
    assert len([r for r in rows if "test_lm_loss" in r]) == 1
    assert list((full_dir / "tb").glob("events.out.tfevents.*"))

    # "kill" after iteration 3: a fresh engine resumes from global_step3 and must reproduce 4..6 bit for bit
    res_dir = tmp_path / "resumed"
    cfg2 = tiny_config(corpus, neox_tokenizer_file, res_dir, train_iters=6, checkpoint__save=str(res_dir / "ckpt"),
                       checkpoint__checkpoint_factor=3, checkpoint__load=str(full_dir / "ckpt" / "global_step3"),
                       training__eval_interval=2, training__do_test=True, model__hidden_dropout=0.1)
    resumed = pretrain(cfg2)
    assert sorted(resumed.train_losses) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed.train_losses[it] == full.train_losses[it]
    resumed_rows = {r["iteration"]: r for r in _rows(res_dir / "logs") if "lm_loss" in r}
    for r in train_rows[3:]:
        assert resumed_rows[r["iteration"]]["lm_loss"] == r["lm_loss"]
        assert resumed_rows[r["iteration"]]["lr"] == r["lr"]
        assert resumed_rows[r["iteration"]]["grad_norm"] == r["grad_norm"]
    assert resumed.valid_losses[6] == full.valid_losses[6]
    assert resumed.test_loss == full.test_loss


def test_gradient_accumulation_matches_a_bigger_micro_batch(corpus, neox_tokenizer_file, tmp_path):
    """micro 2 x accumulation 2 == micro 4 (ZeRO-0, our own norm and clipping) == micro 2 x accumulation 2 under
    ZeRO-1 (DeepSpeed's norm and clipping): same losses, logged gradient norms and weight updates. The norms are
    what catches a gradient scale (a sum instead of a mean over micro-batches), which Adam and clipping hide from the
    losses and the weights."""
    runs = {}
    for name, kw in {"big": dict(micro=4, gas=1), "acc": dict(micro=2, gas=2),
                     "acc_zero1": dict(micro=2, gas=2, training__zero_optimization={"stage": 1},
                                       training__zero_stage=1)}.items():
        runs[name] = pretrain_with_weights(tiny_config(corpus, neox_tokenizer_file, tmp_path / name, train_iters=3,
                                                       optimizer__eps=WEIGHT_CHECK_ADAM_EPS, **kw))
    big, initial, big_weights = runs["big"]
    big_norms = logged_grad_norms(tmp_path / "big" / "logs")
    assert sorted(big_norms) == [1, 2, 3] and all(n > 1.0 for n in big_norms.values())  # clipped to 1.0: clip on
    for name in ("acc", "acc_zero1"):
        result, init, weights = runs[name]
        for key, w0 in initial.items():
            torch.testing.assert_close(init[key], w0, rtol=0, atol=0, msg=key)
        norms = logged_grad_norms(tmp_path / name / "logs")
        for it in (1, 2, 3):
            assert result.train_losses[it] == pytest.approx(big.train_losses[it], rel=1e-5, abs=1e-5)
            assert norms[it] == pytest.approx(big_norms[it], rel=1e-6, abs=0), (name, it)
        mismatch = update_mismatch(initial, weights, big_weights)
        assert max(mismatch.values()) <= 5e-5, (name, mismatch)  # measured <= 7e-6
    # the updates matter: later losses differ from the first one, so equal losses mean equal updates
    assert big.train_losses[3] != big.train_losses[1]


def test_fp16_on_cpu_is_rejected_before_any_work(corpus, neox_tokenizer_file, tmp_path):
    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path, training__precision="fp16",
                      training__fp16={"enabled": True})
    with pytest.raises(DeviceConfigError, match="fp16.*CUDA.*bf16"):
        pretrain(cfg)
    assert not (tmp_path / "logs").exists()


def test_separator_ids_outside_the_vocab_are_rejected(corpus, neox_tokenizer_file, tmp_path):
    from megatron.config import ConfigError

    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path)
    cfg.sepllm.separator_token_ids = [13, 99999]
    with pytest.raises(ConfigError, match="99999"):
        pretrain(cfg)


def test_sepllm_retention_is_logged_every_n_forward_calls(corpus, neox_tokenizer_file, tmp_path, capsys):
    from megatron.config import load_config
    from train_helpers import tiny_sepllm_keys

    cfg = load_config(tiny_sepllm_keys(corpus, neox_tokenizer_file, tmp_path, PRINT_KV_RATIO=True,
                                       print_ratio_intervals=3, gradient_accumulation_steps=2))
    assert cfg.sepllm.mode == "sepllm"
    pretrain(cfg)  # 4 iterations x 2 micro-batches = 8 forward calls -> reports after calls 3 and 6
    rows = [r for r in _rows(tmp_path / "logs") if "retention/kv_retention/total" in r]
    assert [(r["iteration"], r["train_forward_calls"]) for r in rows] == [(2, 3), (3, 6)]
    for r in rows:
        assert 0.0 < r["retention/attn_map_retention/total"] < 1.0  # window 8 of 32 tokens drops entries
    out = capsys.readouterr().out
    assert out.count("SepLLM retention after") == 2
    # the start-up log carries the size summary of `python -m megatron.config --summary` (the trainer pads the vocab)
    from megatron.training.size_summary import summarize, summary_lines

    cfg.model.padded_vocab_size = 50304
    assert all(line in out for line in summary_lines(summarize(cfg)))


def test_load_equal_to_save_starts_fresh_then_resumes(corpus, neox_tokenizer_file, tmp_path):
    ck = str(tmp_path / "ckpt")
    first = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "a", train_iters=2, checkpoint__save=ck,
                                 checkpoint__load=ck, checkpoint__extra_save_iters=[0]))
    assert sorted(first.train_losses) == [1, 2]
    assert [Path(p).name for p in first.checkpoints] == ["global_step0", "global_step2"]  # 0 = initial weights
    # a longer run changes lr_decay_iters (= train_iters here): GPT-NeoX needs override_lr_scheduler for that
    again = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "b", train_iters=3, checkpoint__save=ck,
                                 checkpoint__load=ck, lr_schedule__override_lr_scheduler=True))
    assert sorted(again.train_losses) == [3]  # picked up global_step2 through `latest`


def test_bf16_with_zero1_trains_and_resumes_exactly(corpus, neox_tokenizer_file, tmp_path):
    kw = dict(train_iters=4, training__precision="bf16", training__bf16={"enabled": True},
              training__zero_optimization={"stage": 1}, training__zero_stage=1, checkpoint__checkpoint_factor=2)
    full = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "a", checkpoint__save=str(tmp_path / "ck"),
                                **kw))
    assert all(math.isfinite(v) for v in full.train_losses.values())
    resumed = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "b",
                                   checkpoint__load=str(tmp_path / "ck" / "global_step2"), **kw))
    assert {i: resumed.train_losses[i] for i in (3, 4)} == {i: full.train_losses[i] for i in (3, 4)}
