"""Checkpoints that travel: a checkpoint written under one layout (DP x TP x PP, ZeRO stage, precision) resumes under
another with its whole training state (fp32 masters, optimizer moments and step count, LR position, data position),
through the layout-free optimizer files (``megatron/checkpoint/layout_free.py``).

Every matrix case trains ITERS // 2 iterations at layout A, saves, resumes at layout B with the same global batch
and must continue the uninterrupted curve: one one-process ZeRO-1 run of ITERS iterations, which every 2-rank layout
reproduces to 1e-5 (``tests/test_train_parallel.py``). All 2-rank runs share one spawned process group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron.checkpoint.format import read_meta
from megatron.training import pretrain
from parallel_spawn import run_distributed
from sep_helpers import make_sepllm_cfg
from test_checkpointing import _engine, _train
from train_helpers import tiny_config

ITERS = 8
SAVE_AT = 3
REL_TOL = 1e-5


def _zero(stage: int) -> dict:
    return {"training__zero_optimization": {"stage": stage}, "training__zero_stage": stage}


LAYOUTS = {  # name -> (processes, micro batch, overrides); every layout has global batch 2
    "one": (1, 2, _zero(1)),
    "dp2": (2, 1, _zero(1)),
    "dp2_z3": (2, 1, _zero(3)),
    "dp2_z0": (2, 1, _zero(0)),
    "tp2": (2, 2, {**_zero(1), "parallel__model_parallel_size": 2}),
    "pp2": (2, 2, {**_zero(1), "parallel__pipe_parallel_size": 2}),
}
# case -> (run of layout B, the run whose checkpoint it resumes, iteration of that checkpoint). Cases are chained
# (a resumed run saves one iteration later for the next case), so 9 short runs cover the 8 cases; the 2-rank runs
# are ordered plain data parallel first (DeepSpeed keeps the last TP / PP run's mpu in a module global).
CASES = {
    "DP1->DP2": ("dp2", "ref", SAVE_AT),
    "ZeRO-1 DP2->ZeRO-3 DP2": ("dp2_z3", "dp2", SAVE_AT + 1),
    "ZeRO-3 DP2->ZeRO-0 DP2": ("dp2_z0", "dp2_z3", SAVE_AT + 2),
    "TP1->TP2": ("tp2", "ref", SAVE_AT),
    "PP1->PP2": ("pp2", "ref", SAVE_AT),
    "DP2->DP1": ("one", "dp2", SAVE_AT + 1),
    "TP2->TP1": ("one", "tp2", SAVE_AT + 1),
    "PP2->PP1": ("one", "pp2", SAVE_AT + 1),
}
SAVES = {"ref": SAVE_AT, "dp2": SAVE_AT + 1, "dp2_z3": SAVE_AT + 2, "tp2": SAVE_AT + 1, "pp2": SAVE_AT + 1}


def _cfg(corpus: str, tokenizer: Path, run_dir: Path, layout: str, micro: int | None = None, **overrides):
    _, layout_micro, par = LAYOUTS[layout]
    micro = micro or layout_micro
    cfg = tiny_config(corpus, tokenizer, run_dir, train_iters=ITERS, micro=micro, **par, **overrides)
    cfg.sepllm = make_sepllm_cfg(num_layers=cfg.model.num_layers, window=8)
    cfg.model.padded_vocab_size = 50432  # the same weights under every TP size
    return cfg


def _losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}


def _run_all(rank: int, world_size: int, cfgs: list) -> None:
    for cfg in cfgs:  # one process group for every 2-rank run: start-up dominates these tiny runs
        pretrain(cfg)


def _run_dir(tmp: Path, case: str) -> Path:
    return tmp / case.replace(" ", "_").replace(">", "")


def _resume_cfg(corpus, tokenizer, tmp: Path, case: str):
    layout, source, step = CASES[case]
    src = tmp / "ref" if source == "ref" else _run_dir(tmp, next(c for c, v in CASES.items() if v[0] == source))
    run = _run_dir(tmp, case)
    saves = {"checkpoint__save": str(run / "ckpt"), "checkpoint__extra_save_iters": [SAVES[layout]]} \
        if layout in SAVES else {}
    return _cfg(corpus, tokenizer, run, layout, checkpoint__load=str(src / "ckpt" / f"global_step{step}"), **saves)


@pytest.mark.distributed
def test_checkpoints_resume_under_any_layout(corpus, neox_tokenizer_file, tmp_path, capsys):
    """The layout matrix of issue 21: each resumed curve equals the uninterrupted one within 1e-5 relative."""
    tok = neox_tokenizer_file
    ref = pretrain(_cfg(corpus, tok, tmp_path / "ref", "one", checkpoint__save=str(tmp_path / "ref" / "ckpt"),
                        checkpoint__extra_save_iters=[SAVE_AT])).train_losses
    two_rank = [c for c, (layout, _, _) in CASES.items() if LAYOUTS[layout][0] == 2]
    run_distributed(_run_all, 2, [_resume_cfg(corpus, tok, tmp_path, c) for c in two_rank], timeout=600)
    for case in CASES:
        if case not in two_rank:
            pretrain(_resume_cfg(corpus, tok, tmp_path, case))
    _check_changed_global_batch(corpus, tok, tmp_path)
    worst = {}
    for case, (_, _, step) in CASES.items():
        got = _losses(_run_dir(tmp_path, case) / "logs")
        assert sorted(got) == list(range(step + 1, ITERS + 1)), (case, got)
        worst[case] = max(abs(got[i] - ref[i]) / abs(ref[i]) for i in got)
    with capsys.disabled():
        print("\nmax relative loss difference per case:", json.dumps(worst))
    assert max(worst.values()) <= REL_TOL, worst
    meta = read_meta(_run_dir(tmp_path, "TP1->TP2") / "ckpt" / f"global_step{SAVE_AT + 1}")
    assert meta["optimizer_layout_free"] and meta["tensor_parallel_size"] == 2 and meta["global_batch_size"] == 2
    # what tools/ckpts/inspect_checkpoint.py prints for the TP=2 checkpoint: merged shapes, position, layout
    lines = _inspect([str(_run_dir(tmp_path, "TP1->TP2") / "ckpt" / f"global_step{SAVE_AT + 1}")], capsys)
    assert lines[1:4] == [f"iteration    {SAVE_AT + 1}", "seen         256 tokens (8 samples x seq 32)",
                          "layout       world size 2 = DP 1 x TP 2 x PP 1 | ZeRO 1 | precision fp32 | global batch 2"]
    assert "layout-free copy (2 file(s); step 4; states exp_avg, exp_avg_sq, fp32)" in lines[4]
    assert any(line.split()[:3] == ["embed.word_embeddings.weight", "(50432,", "64)"] for line in lines)


def _check_changed_global_batch(corpus: str, tok: Path, tmp_path: Path) -> None:
    """Item 2 of issue 21: resuming with global batch 4 (micro 4) from the batch-2 checkpoint says so in one line
    and continues at the checkpoint's sample (6 consumed after 3 iterations of 2), 4 samples per step."""
    import io

    out = io.StringIO()
    run = tmp_path / "batch4"
    pretrain(_cfg(corpus, tok, run, "one", micro=4, checkpoint__load=str(tmp_path / "ref" / "ckpt" /
                                                                         f"global_step{SAVE_AT}")), stream=out)
    lines = [line for line in out.getvalue().splitlines() if "global batch changes" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"resume: global batch changes from 2 (checkpoint, data parallel size 1) to 4 (data parallel size 1); "
        f"training continues at sample {2 * SAVE_AT}, each step now reads 4 samples"), out.getvalue()
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["consumed_samples"] for r in rows if "lm_loss" in r] == [2 * SAVE_AT + 4 * k
                                                                     for k in range(1, ITERS - SAVE_AT + 1)]


def _inspect(argv: list[str], capsys) -> list[str]:
    import runpy

    tool = Path(__file__).resolve().parents[1] / "tools" / "ckpts" / "inspect_checkpoint.py"
    main = runpy.run_path(str(tool), run_name="inspect_checkpoint")["main"]
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_a_checkpoint_without_its_layout_free_copy_still_needs_the_same_layout(tmp_path):
    """Older checkpoints (no optim_full_*.pt): a changed layout stops with the one-line error naming no_load_optim;
    the same layout resumes through DeepSpeed's own per-rank files."""
    from megatron.checkpoint.format import CheckpointError
    from megatron.training.checkpointing import RunSnapshot, load_checkpoint, save_checkpoint

    a = _engine(zero=1)
    _train(a, 2)
    path = save_checkpoint(tmp_path, a, RunSnapshot(iteration=2), rank=0, world_size=1)
    for f in path.glob("optim_full_*.pt"):
        f.unlink()
    meta = json.loads((path / "meta.json").read_text())
    meta["optimizer_layout_free"] = False
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="was written with ZeRO stage 1, the run uses stage 3; set no_load_optim"):
        load_checkpoint(tmp_path, _engine(zero=3), rank=0, world_size=1)
    expected = _train(a, 2, seed=9)
    b = _engine(zero=1, seed=3)
    assert load_checkpoint(tmp_path, b, rank=0, world_size=1)["resume_notes"] == []
    assert _train(b, 2, seed=9) == expected


@pytest.mark.parametrize("src, dst", [((0, False), (3, False)), ((2, True), (0, True)), ((0, True), (1, True))])
def test_zero_stage_and_precision_changes_restore_masters_moments_and_steps(tmp_path, src, dst):
    """One process, toy model: ZeRO 0 <-> 1-3, fp32 and bf16. Same precision: the continued losses are identical;
    the fp32 masters, moments and step count of the new engine are those saved."""
    from megatron.checkpoint.layout_free import read_full_optimizer_state
    from megatron.training.checkpointing import RunSnapshot, load_checkpoint, save_checkpoint
    from megatron.training.optimizer_state import gather_full_optimizer_state
    from megatron.checkpoint.format import CheckpointLayout

    a = _engine(zero=src[0], bf16=src[1])
    _train(a, 3)
    path = save_checkpoint(tmp_path, a, RunSnapshot(iteration=3), rank=0, world_size=1)
    expected = _train(a, 3, seed=9)
    b = _engine(zero=dst[0], bf16=dst[1], seed=42)
    meta = load_checkpoint(tmp_path, b, rank=0, world_size=1)
    assert "optimizer state converted" in meta["resume_notes"][0]
    saved = read_full_optimizer_state(path, [n for n, _ in b.module.named_parameters()], 0, 1)
    now = gather_full_optimizer_state(b, CheckpointLayout(), keep=True)
    # the source optimizer's own count travels (DeepSpeed's unfused bf16 optimizer takes one zero step at start-up)
    assert saved.step == now.step == (4 if src == (0, True) else 3) and sorted(saved.states) == sorted(now.states) == ["exp_avg", "exp_avg_sq",
                                                                                           "fp32"]
    for kind, tensors in saved.states.items():
        for name, value in tensors.items():
            assert torch.equal(now.states[kind][name], value), (kind, name)
    assert _train(b, 3, seed=9) == expected


def test_inspect_checkpoint_json_and_errors(tmp_path, capsys):
    """The inspection tool on a toy checkpoint: the JSON holds the same facts; a bad path is one error line, exit 2."""
    from megatron.training.checkpointing import RunSnapshot, save_checkpoint

    a = _engine(zero=1)
    _train(a, 2)
    save_checkpoint(tmp_path / "ck", a, RunSnapshot(iteration=2, consumed_train_samples=4,
                                                    config_yaml="model: {seq_length: 16}\n"), rank=0, world_size=1)
    lines = _inspect([str(tmp_path / "ck"), "--no-tensors", "--json", str(tmp_path / "info.json")], capsys)
    assert lines[2] == "seen         64 tokens (4 samples x seq 16)" and not any("inp.weight" in x for x in lines)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["iteration"] == 2 and info["tokens_seen"] == 64 and info["layout"]["zero_stage"] == 1
    assert {t["name"]: t["shape"] for t in info["tensors"]}["inp.weight"] == [8, 8] and info["parameters"] == 97
    assert info["optimizer"]["layout_free_files"] == ["optim_full_tp00_pp00.pt"] and info["optimizer"]["step"] == 2
    import runpy

    tool = Path(__file__).resolve().parents[1] / "tools" / "ckpts" / "inspect_checkpoint.py"
    assert runpy.run_path(str(tool), run_name="x")["main"]([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"inspect_checkpoint: error: checkpoint path "
                                                            f"{tmp_path / 'nope'} does not exist"]


def test_reshard_tool_keeps_the_layout_free_optimizer_state(tmp_path):
    """tools/ckpts/reshard_tp.py copies optim_full_*.pt (not the per-rank DeepSpeed files): the converted
    checkpoint resumes with its optimizer state, on the same curve."""
    from megatron.parallel.reshard import reshard_checkpoint
    from megatron.training.checkpointing import RunSnapshot, load_checkpoint, save_checkpoint

    a = _engine(zero=1)
    _train(a, 3)
    save_checkpoint(tmp_path / "src", a, RunSnapshot(iteration=3), rank=0, world_size=1)
    expected = _train(a, 3, seed=9)
    dst = reshard_checkpoint(tmp_path / "src", tmp_path / "dst", 1)
    assert sorted(p.name for p in dst.glob("optim*")) == ["optim_full_tp00_pp00.pt"]
    b = _engine(zero=1, seed=5)
    meta = load_checkpoint(tmp_path / "dst", b, rank=0, world_size=1)
    assert "converted by tools/ckpts/reshard_tp.py" in meta["resume_notes"][0]
    assert _train(b, 3, seed=9) == expected
