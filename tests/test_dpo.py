"""DPO (``train_impl: dpo``): the loss and every gradient against the formula written out here, the reference
options (frozen model, precomputed log-probabilities, reference-free), the pairwise data, a short run whose
reward margin rises, an exact resume, two data-parallel (ZeRO-1) or tensor-parallel ranks against one process, bad
configs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.config import ConfigError, load_config
from megatron.data.pairwise_dataset import PairSource, PairwiseDataset
from megatron.data.preference_prep import prepare_preference_data
from megatron.training import pretrain
from megatron.training.batches import BatchRules
from megatron.training.dpo import REFERENCE_FILE, DPOForward
from megatron.training.distributed import DistInfo
from megatron.training.preference_data import make_preference_batch
from megatron.training.reference_logps import write_reference_logps
from train_helpers import REPO, tiny_config

SEQ = 24
BETA = 0.5
PATTERN = "abcdefgh"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, str]:
    """48 preference records (chosen = a fixed pattern, rejected = its reverse) as the four char-level datasets."""
    folder = tmp_path_factory.mktemp("pairs")
    with open(folder / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for i in range(48):
            handle.write(json.dumps({"prompt": f"q{i % 7}{'x' * (i % 4)}:", "chosen": PATTERN,
                                     "rejected": PATTERN[::-1]}) + "\n")
    return prepare_preference_data(folder / "pairs.jsonl", str(folder / "pref"), "CharLevelTokenizer").prefixes


def dpo_config(pairs: dict[str, str], run_dir: Path, train_iters: int = 6, micro: int = 4, **overrides):
    cfg = tiny_config("unused", Path("unused"), run_dir, train_iters=train_iters, micro=micro, seq=SEQ, **overrides)
    cfg.tokenizer.tokenizer_type, cfg.tokenizer.vocab_file = "CharLevelTokenizer", None
    d, t = cfg.data, cfg.training
    d.data_path, d.dataset_impl = None, "pairwise"
    d.pos_train_data_paths, d.neg_train_data_paths = [pairs["chosen"]], [pairs["rejected"]]
    d.pos_train_label_data_paths, d.neg_train_label_data_paths = [pairs["chosen_label"]], [pairs["rejected_label"]]
    d.pos_valid_data_paths, d.neg_valid_data_paths = [pairs["chosen"]], [pairs["rejected"]]
    d.pos_valid_label_data_paths, d.neg_valid_label_data_paths = [pairs["chosen_label"]], [pairs["rejected_label"]]
    t.train_impl, t.dpo_beta = "dpo", BETA
    cfg.lr_schedule.lr_decay_style = "constant"
    return cfg


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------------ data


def test_preference_prep_and_pairwise_rows(pairs):
    source = PairSource.open(pairs["chosen"], pairs["rejected"], pairs["chosen_label"], pairs["rejected_label"])
    ds = PairwiseDataset("train", source, 100, SEQ, seed=7)
    assert len(ds) >= 100
    sample = ds[0]
    assert set(sample) == {"pos", "pos_label", "neg", "neg_label"}
    for key, row in sample.items():
        assert row.dtype == np.int64 and row.shape == (SEQ + 1,), key
    for side, response in (("pos", PATTERN), ("neg", PATTERN[::-1])):
        text, label = sample[side], sample[f"{side}_label"]
        counted = label[label >= 0]
        assert "".join(map(chr, counted[:-1])) == response and counted[-1] == 0  # the response + end of document
        n = int(np.flatnonzero(text)[-1]) + 2                                      # prompt + response + eod
        assert (text[n:] == 0).all() and (label[n:] == -100).all()                # padding: token 0, never counted
        prompt = label[: n - len(response) - 1]
        assert (prompt == -100).all() and chr(text[0]) == "q"                     # the prompt is not counted
    again = PairwiseDataset("train", source, 100, SEQ, seed=7)
    other = PairwiseDataset("train", source, 100, SEQ, seed=8)
    order = [int(ds.pairs[i]) for i in range(len(ds))]
    assert order == [int(again.pairs[i]) for i in range(len(again))]               # same seed, same order
    assert order != [int(other.pairs[i]) for i in range(len(other))]
    assert all(np.array_equal(ds[i]["neg"], again[i]["neg"]) for i in range(0, len(ds), 9))


def test_preference_prep_with_a_chat_template(tmp_path):
    """--chat-template plain: the prompt is the rendered user turn plus the reply's opening, as SFT data is cut."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n")
    prefixes = prepare_preference_data(tmp_path / "p.jsonl", str(tmp_path / "t"), "CharLevelTokenizer",
                                       chat_template="plain").prefixes
    source = PairSource.open(prefixes["chosen"], prefixes["rejected"], prefixes["chosen_label"],
                             prefixes["rejected_label"])
    for side, reply in (("pos", "yes"), ("neg", "no")):
        text, label = getattr(source, side)[0], getattr(source, f"{side}_label")[0]
        assert "".join(map(chr, text[:-1])) == f"### User:\nhi\n\n### Assistant:\n{reply}\n\n" and text[-1] == 0
        assert "".join(chr(t) for t in label[:-1] if t >= 0) == f"{reply}\n\n"


# ------------------------------------------------------------------------------------------------------------ math


def _reference_formula(model, reference, sample, beta, precomputed=None):
    """DPO written out: each side on its own, log_softmax, the label's log-probability, summed over label >= 0."""
    def logp(net, side):
        text = torch.as_tensor(sample[side])
        labels = torch.as_tensor(sample[f"{side}_label"])[:, 1:]
        logits = net(text[:, :-1]).float()
        token = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp_min(0)[..., None])[..., 0]
        return (token * (labels >= 0)).sum(-1)

    pi_c, pi_r = logp(model, "pos"), logp(model, "neg")
    if precomputed is not None:
        ref_c, ref_r = precomputed
    elif reference is None:
        ref_c = ref_r = torch.zeros(())
    else:
        with torch.no_grad():
            ref_c, ref_r = logp(reference, "pos"), logp(reference, "neg")
    return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()


def _tiny_models(pairs, tmp_path):
    from megatron.model.gpt import GPTModel

    cfg = dpo_config(pairs, tmp_path)
    cfg.model.padded_vocab_size = 512
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.sepllm)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():  # a reference that differs from the policy
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, reference


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["reference_model", "reference_free", "precomputed"])
def test_loss_and_every_gradient_equal_the_formula(pairs, tmp_path, variant):
    model, reference = _tiny_models(pairs, tmp_path)
    name = None
    if variant == "precomputed":
        name = "tinyref"
        for prefix in (pairs["chosen"], pairs["rejected"]):
            write_reference_logps(reference, prefix, name, SEQ, batch_size=16)
    source = PairSource.open(pairs["chosen"], pairs["rejected"], pairs["chosen_label"], pairs["rejected_label"],
                             reference_name=name)
    ds = PairwiseDataset("train", source, 8, SEQ, seed=3)
    sample = {k: np.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    batch = make_preference_batch(sample, BatchRules(), "cpu")
    forward = DPOForward(beta=BETA, fp32=True, reference_free=variant == "reference_free",
                         precomputed=variant == "precomputed", info=DistInfo(0, 1, 0, "gloo"))
    forward.reference = reference if variant == "reference_model" else None
    loss = forward(model, batch)
    loss.backward()
    ours = _grads(model)
    assert forward.drain()["reward_acc"] >= 0.0
    model.zero_grad()
    expected = _reference_formula(model, reference if variant != "reference_free" else None, sample, BETA)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name_, grad in _grads(model).items():
        torch.testing.assert_close(ours[name_], grad, rtol=1e-4, atol=1e-6, msg=name_)
    if variant == "precomputed":  # the stored log-probabilities give the live reference model's loss
        live = DPOForward(beta=BETA, fp32=True, reference_free=False, precomputed=False,
                          info=DistInfo(0, 1, 0, "gloo"))
        live.reference = reference
        with torch.no_grad():
            torch.testing.assert_close(live(model, batch), loss.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ runs


def test_dpo_run_raises_the_margin_and_resumes_exactly(pairs, tmp_path, capsys):
    """8 steps on chosen = pattern, rejected = its reverse: margin and accuracy rise, the valid loss is the DPO loss
    on valid pairs; a run stopped at 4 and resumed gives the same losses (the reference comes back from disk)."""
    whole = dpo_config(pairs, tmp_path / "whole", train_iters=8, training__eval_interval=4,
                       training__eval_iters=1)
    pretrain(whole)
    rows = [r for r in _rows(tmp_path / "whole") if "lm_loss" in r]
    first, last = rows[0], rows[-1]
    with capsys.disabled():  # shown with -s
        print(f"\nDPO synthetic run: margins {first['margins']:.4f} -> {last['margins']:.4f}, reward_acc "
              f"{first['reward_acc']:.2f} -> {last['reward_acc']:.2f}, loss {first['lm_loss']:.4f} -> "
              f"{last['lm_loss']:.4f}")
    assert first["margins"] == pytest.approx(0.0, abs=1e-5) and first["lm_loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert last["margins"] > 1.0 and last["reward_acc"] == 1.0 and last["lm_loss"] < 0.3
    assert last["chosen_rewards"] > 0 > last["rejected_rewards"]
    valid = [r for r in _rows(tmp_path / "whole") if "valid_lm_loss" in r]
    assert len(valid) == 2 and valid[1]["valid_lm_loss"] < valid[0]["valid_lm_loss"] < 0.7
    assert valid[1]["valid_margins"] > 1.0 and valid[1]["valid_reward_acc"] == 1.0 and "valid_ppl" not in valid[1]
    assert "margins" in capsys.readouterr().out

    save = str(tmp_path / "resumed" / "ckpt")
    part = dpo_config(pairs, tmp_path / "resumed", train_iters=8, training__eval_interval=4, training__eval_iters=1,
                      checkpoint__save=save, checkpoint__checkpoint_factor=4, training__exit_interval=4)
    pretrain(part)
    assert (Path(save) / REFERENCE_FILE).is_file()
    rest = dpo_config(pairs, tmp_path / "resumed", train_iters=8, training__eval_interval=4, training__eval_iters=1,
                      checkpoint__save=save, checkpoint__load=save)
    pretrain(rest)
    out = capsys.readouterr().out
    assert f"DPO reference model: {Path(save) / REFERENCE_FILE}" in out
    resumed = {r["iteration"]: r["lm_loss"] for r in _rows(tmp_path / "resumed") if "lm_loss" in r}
    assert {r["iteration"]: r["lm_loss"] for r in rows} == resumed


def test_missing_preference_data_names_the_tool(pairs, tmp_path):
    from megatron.training.data_setup import DataSetupError

    cfg = dpo_config(pairs, tmp_path)
    cfg.data.neg_train_data_paths = [str(tmp_path / "missing_rejected_document")]
    with pytest.raises(DataSetupError, match="missing_rejected_document.*preprocess_preference_data.py"):
        pretrain(cfg)


def _two_ranks(rank: int, world_size: int, cfgs: list) -> None:
    for cfg in cfgs:
        pretrain(cfg)


@pytest.mark.distributed
def test_two_ranks_data_or_tensor_parallel_equal_one_process(pairs, tmp_path):
    """The same global batch of 4 pairs: 1 process; 2 data-parallel ranks of 2 under ZeRO-1; 2 tensor-parallel ranks
    (vocabulary-parallel log-probabilities, the reference model sharded the same way)."""
    from parallel_spawn import run_distributed

    zero1 = dict(training__zero_optimization={"stage": 1}, training__zero_stage=1)
    one = dpo_config(pairs, tmp_path / "one", train_iters=3, micro=4, **zero1)
    pretrain(one)
    dp = dpo_config(pairs, tmp_path / "dp", train_iters=3, micro=2, **zero1)
    dp.training.train_batch_size = 4  # 2 per rank x 2 ranks
    tp = dpo_config(pairs, tmp_path / "tp", train_iters=3, micro=4, parallel__model_parallel_size=2, **zero1)
    run_distributed(_two_ranks, 2, [dp, tp], timeout=400)
    a = _rows(tmp_path / "one")
    for run in ("dp", "tp"):
        b = _rows(tmp_path / run)
        for key in ("lm_loss", "margins", "reward_acc", "chosen_pos", "ref_neg"):
            np.testing.assert_allclose([r[key] for r in a if key in r], [r[key] for r in b if key in r],
                                       rtol=1e-4, atol=1e-5, err_msg=f"{run}: {key}")


# ------------------------------------------------------------------------------------------------------------ config

_PAIRS = {"train_impl": "dpo", "pos_train_data_paths": ["c"], "neg_train_data_paths": ["r"]}
_BASE = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 32,
         "max-position-embeddings": 32, "train_micro_batch_size_per_gpu": 2, "train-iters": 4}

BAD = [
    ({"train_impl": "kto"}, ["train_impl: kto is not built"]),
    ({"train_impl": "rm"}, ["train_impl: rm is not built"]),
    ({"train_impl": "reinforce"}, ["train_impl: reinforce is not built"]),
    ({"train_impl": "dpo", "pos_train_data_paths": ["c"]}, ["needs pos_train_data_paths", "neg_train_data_paths"]),
    ({**_PAIRS, "neg_train_data_paths": ["r", "r2"]}, ["pos_train_data_paths has 1", "neg_train_data_paths has 2"]),
    ({**_PAIRS, "pos_train_label_data_paths": ["cl"]}, ["pos_train_label_data_paths is set",
                                                        "neg_train_label_data_paths is not"]),
    ({**_PAIRS, "pos_valid_data_paths": ["c"]}, ["pos_valid_data_paths has 1", "neg_valid_data_paths has 0"]),
    ({**_PAIRS, "pipe_parallel_size": 2, "num_gpus": 2}, ["pipe_parallel_size=2 with train_impl dpo"]),
    ({**_PAIRS, "zero_optimization": {"stage": 3}}, ["ZeRO stage 3 with train_impl dpo"]),
    ({**_PAIRS, "compile": True}, ["compile with train_impl dpo and a reference model"]),
    ({**_PAIRS, "dataset_impl": "gpt2"}, ["dataset_impl gpt2 does not fit train_impl dpo"]),
    ({**_PAIRS, "train_data_paths": ["t"]}, ["train_data_paths is language-model data"]),
    ({**_PAIRS, "dpo_beta": 0}, ["key 'dpo_beta'", "> 0"]),
    ({**_PAIRS, "dpo_reference_free": True, "precompute_model_name": "m"}, ["give one of them"]),
    ({"pos_train_data_paths": ["c"]}, ["read only with train_impl dpo"]),
    ({"dataset_impl": "online"}, ["dataset_impl: online is not built"]),
    ({"kto_beta": 0.2}, ["kto_beta=0.2", "not built"]),
]


@pytest.mark.parametrize("keys,fragments", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_dpo_configs_name_the_key(keys, fragments):
    with pytest.raises(ConfigError) as err:
        load_config({**_BASE, **keys})
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_dpo_config_loads_and_cli_refuses_kto_in_one_line(tmp_path):
    cfg = load_config({**_BASE, **_PAIRS, "dataset_impl": "pairwise", "dpo_fp32": False, "dpo_beta": 0.01,
                       "pos_train_label_data_paths": ["cl"], "neg_train_label_data_paths": ["rl"]},
                      for_training=False)
    assert (cfg.training.train_impl, cfg.data.dataset_impl, cfg.training.dpo_beta) == ("dpo", "pairwise", 0.01)
    bad = tmp_path / "kto.yml"
    bad.write_text("train_impl: kto\n")
    proc = subprocess.run([sys.executable, "-m", "megatron.config", str(bad)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "train_impl: kto is not built" in proc.stderr
