"""GPT-NeoX training keys keep GPT-NeoX's meaning (or are refused in one line): run length (train_epochs,
exit_interval), checkpoint contents (no_save_optim / no_save_rng), the LR schedule on resume, optimizers, fp16 and
DeepSpeed pass-through keys, diagnostics, profiling and experiment trackers.

Config rules are checked on ``load_config``; behaviour on tiny CPU runs (2 layers, hidden 64, 32 tokens).
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron.checkpoint.format import CheckpointError
from megatron.config import ConfigError, load_config
from megatron.training import pretrain
from megatron.training.lr_schedules import AnnealingLR, LRScheduleError
from train_helpers import make_tiny_corpus, pretrain_with_weights, tiny_config

TINY = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 32, "train-iters": 100,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}


def _rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ config rules
def test_gpt_neox_defaults_of_the_optimizer_block():
    cfg = load_config({**TINY, "optimizer": {"type": "Adam"}})
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.betas == [0.9, 0.999]
    lion = load_config({**TINY, "optimizer": {"type": "lion", "params": {"lr": 1e-4}}})
    assert lion.optimizer.type == "Lion" and lion.optimizer.betas == [0.9, 0.99]
    assert lion.optimizer.params == {"lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.99]}
    assert load_config({**TINY, "optimizer": {"type": "cpu_torch_adam"}}).optimizer.type == "cpu_adam"
    # a saved resolved config repeats every typed field (eps, momentum) and reads back for any type
    again = load_config(lion.to_dict())
    assert again.optimizer.type == "Lion" and again.optimizer.betas == [0.9, 0.99]


@pytest.mark.parametrize("block, fragment", [
    ({"type": "OneBitAdam"}, "optimizer.type='OneBitAdam': this optimizer is not built here"),
    ({"type": "sm3"}, "optimizer.type='sm3': this optimizer is not built here"),
    ({"type": "madgrad_wd"}, "optimizer.type='madgrad_wd': this optimizer is not built here"),
    ({"type": "Adam", "params": {"amsgrad": True}}, "optimizer.params.amsgrad=True: only false is built"),
    ({"type": "Adam", "params": {"bias_correction": False}}, "Adam without bias correction is not built"),
    ({"type": "Adam", "params": {"freeze_step": 400}},
     "optimizer.params.freeze_step: not an argument of optimizer Adam"),
    ({"type": "SGD", "params": {"betas": [0.9, 0.9]}}, "optimizer.params.betas: not an argument of optimizer SGD"),
    ({"type": "AdamW", "params": {"adam_w_mode": False}}, "adam_w_mode=false contradicts type AdamW"),
])
def test_optimizers_not_built_are_refused_in_one_line(block, fragment):
    with pytest.raises(ConfigError) as info:
        load_config({**TINY, "optimizer": block})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_lr_decay_fraction_and_unrounded_warmup():
    cfg = load_config({**TINY, "train-iters": 1000, "lr-decay-fraction": 0.35, "warmup": 0.013})
    assert cfg.lr_schedule.lr_decay_iters == 350            # floor(1000 x 0.35)
    assert cfg.lr_schedule.warmup_iters == pytest.approx(0.013 * 350)    # 4.55 steps, as GPT-NeoX computes it
    with pytest.raises(ConfigError, match="lr_decay_fraction=0.35 and lr_decay_iters=200 .* both set"):
        load_config({**TINY, "lr-decay-fraction": 0.35, "lr-decay-iters": 200})
    with pytest.raises(ConfigError, match="override_lr_scheduler and use_checkpoint_lr_scheduler"):
        load_config({**TINY, "override_lr_scheduler": True, "use_checkpoint_lr_scheduler": True})
    with pytest.raises(ConfigError, match="min_lr=0.01 exceeds lr=0.001"):
        load_config({**TINY, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "min_lr": 0.01})
    wsd = load_config({**TINY, "lr-decay-style": "WSD", "wsd_decay_fraction": 0.2, "wsd_decay_style": "1-sqrt"})
    assert wsd.lr_schedule.lr_decay_style == "wsd" and wsd.lr_schedule.wsd_decay_style == "1-sqrt"


def test_run_length_keys():
    cfg = load_config({**TINY, "train-iters": None, "train_epochs": 3}, for_training=False)
    assert cfg.training.train_epochs == 3 and cfg.training.train_iters is None
    assert cfg.lr_schedule.lr_decay_iters is None            # derived by the trainer once the epoch is known
    with pytest.raises(ConfigError, match="train_epochs=3 and train_iters=100 .* both set the run length"):
        load_config({**TINY, "train_epochs": 3})
    with pytest.raises(ConfigError, match="train_epochs with 2 train_data_paths"):
        load_config({**TINY, "train-iters": None, "train_epochs": 1, "train_data_paths": ["a", "b"]})
    with pytest.raises(ConfigError, match="train_data_weights=.* with train_epochs"):
        load_config({**TINY, "train-iters": None, "train_epochs": 1, "train_data_paths": ["a"],
                     "train_data_weights": [0.5]})
    with pytest.raises(ConfigError, match="key 'exit_interval': expected a value >= 1"):
        load_config({**TINY, "exit_interval": 0})


@pytest.mark.parametrize("key, value", [("loss_scale", None), ("loss_scale_window", 1000), ("hysteresis", 2),
                                        ("min_scale", 1.0), ("dynamic_loss_scale", True)])
def test_flat_loss_scale_keys_at_their_gpt_neox_default_are_accepted(key, value):
    load_config({**TINY, key: value})


@pytest.mark.parametrize("key, value, block_key", [
    ("loss_scale", 1024, "loss_scale"), ("loss-scale-window", 500, "loss_scale_window"),
    ("hysteresis", 4, "hysteresis"), ("min_scale", 2.0, "min_loss_scale"), ("dynamic_loss_scale", False, "loss_scale")])
def test_flat_loss_scale_keys_with_another_value_are_refused(key, value, block_key):
    # GPT-NeoX stopped passing these to DeepSpeed: honouring them would train differently from GPT-NeoX
    with pytest.raises(ConfigError, match=f"GPT-NeoX does not pass the flat loss-scale keys.*fp16.{block_key}"):
        load_config({**TINY, key: value})


def test_deepspeed_extra_args_and_fp32_allreduce_reach_the_deepspeed_config():
    cfg = load_config({**TINY, "fp32_allreduce": True,
                       "deepspeed_extra_args": {"data_types": {"grad_accum_dtype": "fp32"},
                                                "bf16": {"enabled": True}, "steps_per_print": 7}})
    ds = cfg.deepspeed_config(1)
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["bf16"] == {"enabled": True} and cfg.training.precision == "bf16" and ds["steps_per_print"] == 7
    with pytest.raises(ConfigError, match="'deepspeed_extra_args.num_layers': not a DeepSpeed config key"):
        load_config({**TINY, "deepspeed_extra_args": {"num_layers": 3}})
    with pytest.raises(ConfigError, match="'steps_per_print' and 'deepspeed_extra_args.steps_per_print' both set"):
        load_config({**TINY, "steps_per_print": 3, "deepspeed_extra_args": {"steps_per_print": 7}})
    with pytest.raises(ConfigError, match="fp32_allreduce=true contradicts communication_data_type='bf16'"):
        load_config({**TINY, "fp32_allreduce": True, "communication_data_type": "bf16"})


@pytest.mark.parametrize("extra, fragment", [
    ({"memory_profiling": True}, "memory_profiling needs memory_profiling_path"),
    ({"profile": True, "profile_step_start": 5, "profile_step_stop": 5, "log_dir": "logs"},
     "profile_step_stop=5 must be larger"),
    ({"profile": True}, "profile writes its trace into <log_dir>/profile .*; set log_dir, save or tensorboard_dir"),
    ({"log_gradient_noise_scale": True, "zero_optimization": {"stage": 1}}, "log_gradient_noise_scale with ZeRO"),
    ({"log_grad_pct_zeros": True, "pipe-parallel-size": 2, "num_gpus": 2}, "log_grad_pct_zeros with pipe_parallel"),
    ({"log_gradient_noise_scale": True, "gradient_noise_scale_n_batches": 1}, "gradient_noise_scale_n_batches"),
])
def test_diagnostics_keys_that_cannot_run_are_refused(extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config({**TINY, **extra})


# ------------------------------------------------------------------------------------------------ LR schedule
def test_resume_refuses_a_changed_schedule_unless_told_which_wins(corpus, neox_tokenizer_file, tmp_path):
    first = tiny_config(corpus, neox_tokenizer_file, tmp_path / "a", train_iters=4, checkpoint__checkpoint_factor=2,
                        checkpoint__save=str(tmp_path / "a" / "ck"))
    pretrain(first)
    step2 = str(tmp_path / "a" / "ck" / "global_step2")

    def resumed(name, **flags):
        return tiny_config(corpus, neox_tokenizer_file, tmp_path / name, train_iters=5, checkpoint__load=step2,
                           **{f"lr_schedule__{k}": v for k, v in flags.items()})

    with pytest.raises(LRScheduleError, match=r"lr_decay_iters 4 \(checkpoint\) vs 5 \(config\)"):
        pretrain(resumed("plain"))
    pretrain(resumed("override", override_lr_scheduler=True))
    pretrain(resumed("keep", use_checkpoint_lr_scheduler=True))
    # tiny_config: warmup_iters = max(1, int(0.1 x train_iters)) = 1, lr_decay_iters = train_iters
    new = AnnealingLR(max_lr=3e-3, warmup_iters=1, lr_decay_iters=5, decay_style="cosine", min_lr=3e-4)
    old = AnnealingLR(max_lr=3e-3, warmup_iters=1, lr_decay_iters=4, decay_style="cosine", min_lr=3e-4)
    for name, ref in (("override", new), ("keep", old)):
        lrs = {r["iteration"]: r["lr"] for r in _rows(tmp_path / name / "logs") if "lm_loss" in r}
        assert sorted(lrs) == [3, 4, 5]
        assert [lrs[k] for k in sorted(lrs)] == pytest.approx([ref.lr_for(k - 1) for k in range(3, 6)])
    assert new.lr_for(4) != old.lr_for(4)          # the two rules give different rates at iteration 5


# ------------------------------------------------------------------------------------------------ run length
def test_train_epochs_derive_train_iters_and_repeat_the_epoch(tmp_path, pg19_dir, neox_tokenizer_file):
    from megatron.training.data_setup import RepeatedEpochs, build_datasets, epoch_train_iters

    prefix = make_tiny_corpus(tmp_path / "small", sorted(pg19_dir.glob("*.txt"))[1], neox_tokenizer_file,
                              chars=6000)
    cfg = tiny_config(prefix, neox_tokenizer_file, tmp_path, micro=4, gas=2, training__train_iters=None,
                      training__train_epochs=2, lr_schedule__lr_decay_iters=None, lr_schedule__warmup_iters=None)
    one_epoch = len(build_datasets(cfg, 8, None, splits=(True, False, False)).train)
    expected = (one_epoch // 4) * 2 // 2
    assert expected == epoch_train_iters(one_epoch, 4, 1, 2, 2) and expected >= 3
    result = pretrain(cfg)
    assert result.iteration == expected == max(result.train_losses)
    rows = [r for r in _rows(tmp_path / "logs") if "lm_loss" in r]
    assert rows[-1]["consumed_samples"] == expected * 8
    assert rows[-1]["lr"] < rows[1]["lr"]                     # the schedule decays over the derived length
    # the second epoch reads the first one's samples in the same order (GPT-NeoX cycles its loader)
    repeated = RepeatedEpochs(list(range(one_epoch)), (one_epoch // 4) * 4, expected * 8)
    usable = (one_epoch // 4) * 4
    assert [repeated[i] for i in range(usable, usable + 5)] == [0, 1, 2, 3, 4]


def test_exit_interval_stops_after_that_iteration_without_saving_again(corpus, neox_tokenizer_file, tmp_path):
    save = tmp_path / "ck"
    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=6, checkpoint__save=str(save),
                      checkpoint__checkpoint_factor=2, training__exit_interval=3, training__do_test=True,
                      checkpoint__no_save_optim=True, checkpoint__no_save_rng=True)
    result = pretrain(cfg)
    assert result.iteration == 3 and sorted(result.train_losses) == [1, 2, 3]
    assert [Path(p).name for p in result.checkpoints] == ["global_step2"]   # GPT-NeoX exits without a final save
    assert not [r for r in _rows(tmp_path / "logs") if "test_lm_loss" in r]
    files = sorted(p.name for p in (save / "global_step2").iterdir())
    assert not [f for f in files if f.startswith(("optim_rank", "rng_rank"))] and "model_states.pt" in files
    meta = json.loads((save / "global_step2" / "meta.json").read_text())
    assert meta["has_optimizer"] is False and meta["has_rng"] is False

    again = tiny_config(corpus, neox_tokenizer_file, tmp_path / "r", train_iters=6, checkpoint__load=str(save))
    with pytest.raises(CheckpointError, match="saved without optimizer state \\(no_save_optim\\); set no_load_optim"):
        pretrain(again)
    again.checkpoint.no_load_optim = True
    with pytest.raises(CheckpointError, match="saved without RNG states \\(no_save_rng\\); set no_load_rng"):
        pretrain(again)
    again.checkpoint.no_load_rng = True
    assert sorted(pretrain(again).train_losses) == [3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ diagnostics
def test_per_iteration_diagnostics_profile_and_memory_line(corpus, neox_tokenizer_file, tmp_path, capsys):
    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=5, logging__log_param_norm=True,
                      logging__log_grad_norm=True, logging__log_grad_pct_zeros=True,
                      logging__log_optimizer_states=True, logging__log_gradient_noise_scale=True,
                      logging__gradient_noise_scale_n_batches=2, logging__profile=True,
                      logging__profile_step_start=1, logging__profile_step_stop=2, logging__memory_profiling=True,
                      logging__memory_profiling_path=str(tmp_path / "mem"), training__gradient_clipping=1e-3,
                      lr_schedule__warmup_iters=2.5, lr_schedule__lr_decay_style="linear")
    _, _, final = pretrain_with_weights(cfg)
    rows = _rows(tmp_path / "logs")
    names = sorted(final)
    diag = {r["iteration"]: r for r in rows if any(k.startswith("parameter_norms/") for k in r)}
    train = {r["iteration"]: r for r in rows if "lm_loss" in r}
    # GPT-NeoX's schedule: iteration k uses the rate after k - 1 steps, warmup 2.5 steps unrounded with max(1, n)
    lrs = [train[k]["lr"] for k in range(1, 6)]
    ref = AnnealingLR(max_lr=3e-3, warmup_iters=2.5, lr_decay_iters=5, decay_style="linear", min_lr=3e-4)
    assert lrs == pytest.approx([ref.lr_for(k - 1) for k in range(1, 6)])
    assert lrs[:4] == pytest.approx([1.2e-3, 1.2e-3, 2.4e-3, 3e-3 * (2.5 - 0.5) / 2.5])
    assert sorted(diag) == [1, 2, 3, 4, 5]
    for name in names:   # the norms after the last step are the trained weights' norms
        assert diag[5][f"parameter_norms/{name}"] == pytest.approx(float(final[name].double().norm()), rel=1e-6)
    for it in range(1, 6):  # per-parameter gradient norms add up to the global (pre-clipping) norm
        total = math.sqrt(sum(diag[it][f"gradient_norms/{n}"] ** 2 for n in names))
        assert total == pytest.approx(train[it]["grad_norm"], rel=1e-5)
        assert train[it]["grad_norm"] > 1e-3                    # so the logged values are before clipping
        assert all(0.0 <= diag[it][f"pct_grad_zeros/{n}"] <= 100.0 for n in names)
        assert diag[it]["pct_grad_zeros/embed.word_embeddings.weight"] > 99.0   # 64 tokens of a 50k vocabulary
        assert diag[it]["pct_grad_zeros/layers.0.attention.dense.weight"] < 1.0
    states = {r["iteration"]: r for r in rows if any(k.startswith("optimizer_state_norms/") for k in r)}
    assert sorted(states) == [1, 2, 3, 4, 5]
    import re

    keys = [re.fullmatch(r"optimizer_state_norms/(\d+)_(exp_avg|exp_avg_sq)", k) for k in states[5]
            if k.startswith("optimizer_state_norms/")]
    assert all(keys) and len(keys) == 2 * len(names)          # Adam: two moments per parameter, indexed as in torch
    assert sorted({int(m.group(1)) for m in keys}) == list(range(len(names)))
    assert all(states[5][m.group(0)] > 0 for m in keys)
    noise = {r["iteration"]: r["noise_scale"] for r in rows if "noise_scale" in r}
    assert sorted(noise) == [2, 3, 4, 5] and math.isfinite(noise[2]) and noise[2] == noise[3] != noise[4]

    traces = list((tmp_path / "logs" / "profile").glob("rank0*.pt.trace.json"))
    assert len(traces) == 1
    events = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert "ProfilerStep#2" in events and not {"ProfilerStep#1", "ProfilerStep#3"} & events
    assert "memory_profiling: CUDA memory snapshots need a CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "mem").exists()


def test_diagnostics_under_zero3_cover_whole_parameters(corpus, neox_tokenizer_file, tmp_path):
    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=2, micro=1, logging__log_param_norm=True,
                      logging__log_grad_norm=True, logging__log_optimizer_states=True,
                      training__zero_optimization={"stage": 3}, training__zero_stage=3)
    _, _, final = pretrain_with_weights(cfg)   # gathered from the ZeRO-3 partitions
    rows = _rows(tmp_path / "logs")
    diag = {r["iteration"]: r for r in rows if any(k.startswith("parameter_norms/") for k in r)}
    train = {r["iteration"]: r for r in rows if "lm_loss" in r}
    for name, weight in final.items():
        assert diag[2][f"parameter_norms/{name}"] == pytest.approx(float(weight.double().norm()), rel=1e-6)
    for it in (1, 2):
        total = math.sqrt(sum(diag[it][f"gradient_norms/{n}"] ** 2 for n in final))
        assert total == pytest.approx(train[it]["grad_norm"], rel=1e-5)
    states = [v for r in rows if r["iteration"] == 2 for k, v in r.items() if k.startswith("optimizer_state_norms/")]
    assert states and all(v > 0 for v in states)   # ZeRO-3 keeps its moments per partition, numbered as created


def test_gradient_noise_scale_matches_the_formula():
    from megatron.training.diagnostics import GradientNoiseScale, ema

    sq = lambda ts: float(sum(t.double().pow(2).sum() for t in ts))  # noqa: E731
    gns = GradientNoiseScale(batch_size_small=4, n_batches=2, sq_norm=sq)
    g1, g2 = [torch.tensor([1.0, 2.0]), torch.tensor([0.5])], [torch.tensor([3.0, 0.0]), torch.tensor([-0.5])]
    gns.update(g1)
    assert gns.noise_scale is None
    gns.update([torch.tensor([float("nan"), 0.0]), torch.tensor([0.0])])   # skipped, not counted
    assert gns.n_updates == 1
    gns.update(g2)
    big = [(a + b) / 2 for a, b in zip(g1, g2)]
    g_big, g_small = sq(big), sq(g2)
    noise = (8 * g_big - 4 * g_small) / 4
    scale = (g_small - g_big) / (1 / 4 - 1 / 8)
    _, noise_c = ema(None, 0.99, noise, 1)
    _, scale_c = ema(None, 0.99, scale, 1)
    assert gns.noise_scale == pytest.approx(scale_c / noise_c) and gns.n_updates == 2


# ------------------------------------------------------------------------------------------------ optimizers
def test_lion_follows_its_update_rule():
    from megatron.training.optimizer import Lion

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    ref_p, ref_m = p.detach().double().clone(), torch.zeros(5, 3, dtype=torch.float64)
    opt = Lion([{"params": [p], "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.99))
    for _ in range(3):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        ref_p = ref_p * (1 - 0.01 * 0.1) - 0.01 * torch.sign(0.9 * ref_m + 0.1 * g.double())
        ref_m = 0.99 * ref_m + 0.01 * g.double()
    assert torch.allclose(p.detach().double(), ref_p, atol=1e-6)
    assert torch.allclose(opt.state[p]["exp_avg"].double(), ref_m, atol=1e-6)


def test_lion_trains_under_zero1(corpus, neox_tokenizer_file, tmp_path):
    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=2, optimizer__type="Lion",
                      optimizer__lr=1e-4, optimizer__betas=[0.9, 0.99], lr_schedule__min_lr=1e-5,
                      training__zero_optimization={"stage": 1}, training__zero_stage=1)
    result, initial, final = pretrain_with_weights(cfg)
    assert all(math.isfinite(v) for v in result.train_losses.values())
    # every matrix moved by lr x (1 +- ...) per step: Lion's sign update
    moved = (final["layers.0.mlp.dense_h_to_4h.weight"] - initial["layers.0.mlp.dense_h_to_4h.weight"]).abs()
    assert float(moved.max()) <= 2 * 1e-4 * 1.01 and float(moved.min()) > 0


def test_cpu_adam_refuses_a_cuda_run_and_a_failed_build_in_one_line(monkeypatch):
    from megatron.training import optimizer as opt_mod

    model = torch.nn.Linear(3, 3)
    cfg = types.SimpleNamespace(type="cpu_adam", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1,
                                momentum=0.0, params={})
    with pytest.raises(opt_mod.OptimizerConfigError, match="cpu_adam on a cuda run.*ZeRO CPU offload"):
        opt_mod.build_optimizer(model, cfg, device_type="cuda")

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error building extension 'cpu_adam'\nninja: build stopped")

    fake = types.ModuleType("deepspeed.ops.adam")
    fake.DeepSpeedCPUAdam = Broken
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", fake)
    with pytest.raises(opt_mod.OptimizerConfigError) as info:
        opt_mod.build_optimizer(model, cfg, device_type="cpu")
    assert "could not be built or loaded (RuntimeError: Error building extension 'cpu_adam')" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_cpu_adam_is_deepspeeds_cpu_adam_and_matches_adamw():
    """JIT-builds DeepSpeed's CPU Adam on first use (minutes on a fresh machine, cached afterwards)."""
    from megatron.training.optimizer import build_optimizer

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    cfg = types.SimpleNamespace(type="cpu_adam", lr=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1,
                                momentum=0.0, params={})
    cpu_adam = build_optimizer(a, cfg)
    adamw = build_optimizer(b, types.SimpleNamespace(**{**vars(cfg), "type": "AdamW"}))
    assert type(cpu_adam).__name__ == "DeepSpeedCPUAdam"
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a.parameters()]
        for model, opt in ((a, cpu_adam), (b, adamw)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


# ------------------------------------------------------------------------------------------------ fp32_allreduce
def test_fp32_allreduce_sums_low_precision_tensors_in_fp32(monkeypatch):
    import torch.distributed as dist

    from megatron.parallel import tp_comm
    from megatron.training.distributed import init_distributed

    init_distributed("cpu", "gloo")
    seen = []
    real = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.dtype)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    y = tp_comm.reduce_from_tp(x, dist.group.WORLD, fp32=True)
    assert y.dtype == torch.bfloat16 and seen == [torch.float32]
    z = tp_comm.copy_to_tp(x, dist.group.WORLD, fp32=True)
    z.sum().backward()
    assert seen == [torch.float32, torch.float32] and x.grad.dtype == torch.bfloat16
    tp_comm.reduce_from_tp(x, dist.group.WORLD)
    assert seen[-1] == torch.bfloat16                        # without the key the sum stays in bf16


# ------------------------------------------------------------------------------------------------ trackers
def test_wandb_host_and_all_ranks(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    from megatron.training.logging import RunLogger

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or types.SimpleNamespace(
        log=lambda *a, **k: calls.append(("log", a, k)), finish=lambda: None))
    cfg = {"project": "p", "mode": "offline", "run_name": "run", "host": "https://wandb.example.org",
           "all_ranks": True}
    RunLogger(tmp_path, wandb_cfg=cfg).close()
    assert calls[0]["settings"].base_url == "https://wandb.example.org" and calls[0]["name"] == "run"
    other = RunLogger(tmp_path / "r1", enabled=False, wandb_cfg=cfg, rank=1)
    assert calls[-1]["name"] == "run-rank1"
    other.log({"iteration": 1, "lm_loss": 2.0})              # rank-0 rows stay on rank 0
    other.log_all_ranks({"iteration": 1, "parameter_norms/w": 2.0})
    other.close()
    assert calls[-1] == ("log", ({"parameter_norms/w": 2.0},), {"step": 1})
    assert not (tmp_path / "r1").exists()
    RunLogger(tmp_path / "r2", enabled=False, wandb_cfg={**cfg, "all_ranks": False}, rank=1).close()
    assert len([c for c in calls if isinstance(c, dict)]) == 2


def test_wandb_offline_with_a_host_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from megatron.training.logging import RunLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, wandb_cfg={"project": "sepllm-test", "mode": "offline", "run_name": "h",
                                            "host": "http://127.0.0.1:9"})
    logger.log({"iteration": 1, "lm_loss": 3.0}, console=False)
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_comet_logs_like_gpt_neox_and_missing_comet_is_one_line(monkeypatch, tmp_path):
    from megatron.training.comet import CometSetupError
    from megatron.training.logging import RunLogger

    calls = []

    class Experiment:
        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k))

    fake = types.ModuleType("comet_ml")
    fake.ExperimentConfig = lambda **kw: ("config", kw)
    fake.start = lambda **kw: calls.append(("start", (), kw)) or Experiment()
    monkeypatch.setitem(sys.modules, "comet_ml", fake)
    cfg = {"workspace": "ws", "project": "proj", "name": "exp", "tags": ["a"], "others": {"k": 1}}
    logger = RunLogger(tmp_path, comet_cfg=cfg, run_config={"model": {"num_layers": 2}})
    logger.log({"iteration": 3, "lm_loss": 2.5, "valid_lm_loss": 2.0}, console=False)
    logger.close()
    names = [c[0] for c in calls]
    assert names == ["start", "log_parameters", "set_name", "add_tags", "log_others", "log_metrics", "end"]
    assert calls[0][2]["workspace"] == "ws" and calls[0][2]["experiment_config"][1] == {"auto_output_logging": False}
    assert calls[1][1][0] == {"model.num_layers": 2}
    assert calls[5][1][0] == {"train/lm_loss": 2.5, "valid/lm_loss": 2.0} and calls[5][2] == {"step": 3}
    monkeypatch.setitem(sys.modules, "comet_ml", None)
    with pytest.raises(CometSetupError, match="use_comet is set but comet_ml is not installed"):
        RunLogger(tmp_path / "b", comet_cfg=cfg)
