"""Trained checkpoints leave the framework: the shared loader (``megatron.model.convert.load_trained_model``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron.config import ConfigError
from megatron.model.convert import load_trained_model, read_full_model_state
from megatron.training import pretrain
from megatron.training.checkpointing import CheckpointError
from train_helpers import make_tiny_corpus, tiny_config

BOOK = Path(__file__).resolve().parents[1] / "megatron" / "data" / "corpora" / "pg19_sample" / "12204.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, neox_tokenizer_file):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), BOOK, neox_tokenizer_file, chars=20_000)


@pytest.fixture(scope="module")
def pythia_run(corpus, neox_tokenizer_file, tmp_path_factory):
    """A Pythia-shaped tiny model (partial rotary, parallel residual, untied head) trained 3 steps; checkpoints at
    steps 2 and 3."""
    run = tmp_path_factory.mktemp("pythia")
    cfg = tiny_config(corpus, neox_tokenizer_file, run, train_iters=3, checkpoint__save=str(run / "ckpt"),
                      checkpoint__checkpoint_factor=2, checkpoint__extra_save_iters=[3])
    pretrain(cfg)
    return run / "ckpt"


def test_loader_reads_latest_and_a_chosen_iteration(pythia_run):
    latest = load_trained_model(pythia_run)
    assert latest.iteration == 3 and latest.checkpoint_dir == pythia_run / "global_step3"
    assert not latest.model.training and latest.config.model.padded_vocab_size == 50304
    saved = torch.load(pythia_run / "global_step3" / "model_states.pt", weights_only=True)
    state = latest.model.state_dict()
    assert sorted(state) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    older = load_trained_model(pythia_run, iteration=2)
    assert older.iteration == 2 and older.checkpoint_dir.name == "global_step2"
    assert not torch.equal(older.model.layers[0].attention.dense.weight, latest.model.layers[0].attention.dense.weight)
    direct = load_trained_model(pythia_run / "global_step2", dtype=torch.bfloat16)
    assert direct.iteration == 2 and next(direct.model.parameters()).dtype == torch.bfloat16
    assert torch.equal(direct.model.embed.word_embeddings.weight, saved_embed(pythia_run, 2).to(torch.bfloat16))


def saved_embed(ckpt: Path, step: int) -> torch.Tensor:
    return read_full_model_state(ckpt / f"global_step{step}")["embed.word_embeddings.weight"]


def test_loader_overrides_and_config_files(pythia_run, tmp_path):
    over = load_trained_model(pythia_run, overrides=["--sep_attention_impl", "dense"])
    assert over.config.sepllm.sep_attention_impl == "dense"
    yml = tmp_path / "train.yml"
    yml.write_text((pythia_run / "global_step3" / "config.yml").read_text().replace("hidden_size: 64", "hidden_size: 128"))
    with pytest.raises(CheckpointError, match=r"does not match the configured model \(shape mismatch: "):
        load_trained_model(pythia_run, config_files=[yml])


def test_loader_bad_input_is_one_line(pythia_run, tmp_path):
    cases = [
        (tmp_path / "nowhere", {}, CheckpointError, r"checkpoint path .*nowhere does not exist"),
        (tmp_path, {}, CheckpointError, r"no checkpoint found in .*: expected a 'latest' file"),
        (pythia_run, {"iteration": 7}, CheckpointError,
         r"no complete checkpoint for iteration 7 in .* \(expected global_step7/meta.json; available iterations: "
         r"\[2, 3\]\)"),
        (pythia_run / "global_step2", {"iteration": 3}, CheckpointError,
         r"holds iteration 2, not the requested iteration 3"),
        (pythia_run, {"overrides": ["--hidden-size", "-4"]}, ConfigError, r"hidden"),
        (pythia_run, {"dtype": torch.int64}, ConfigError, r"dtype = torch.int64: expected a floating torch dtype"),
    ]
    for load_dir, kwargs, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as info:
            load_trained_model(load_dir, **kwargs)
        assert "\n" not in str(info.value)
