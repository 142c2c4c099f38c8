"""Limits known before the run (issue 21, item 4): a run that cannot fit the machine's memory, a seq_length beyond
the learned position table or longer than its data ends in one line (exit 2) before the first iteration."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.config import ConfigError, load_config
from megatron.training import preflight
from megatron.training.preflight import RunLimitError, check_memory_fits
from train_helpers import run_training, tiny_config

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


def _run(cfg, capsys):
    capsys.readouterr()
    rc = run_training(cfg, plot=False)
    out, err = capsys.readouterr()
    return rc, out, err


def test_memory_rule():
    check_memory_fits(3 * GIB, 2, (6 * GIB, "available RAM"), "x")  # exactly fits
    check_memory_fits(100 * GIB, 1, None, "x")  # not measurable: not refused
    with pytest.raises(RunLimitError, match=r"^memory: the run needs about 4\.00 GiB per process x 2 processes \(x; "
                                            r"the --summary estimate\) but this machine has 6\.00 GiB available RAM"):
        check_memory_fits(4 * GIB, 2, (6 * GIB, "available RAM"), "x")
    assert preflight.available_memory("cpu")[0] > 0


def test_a_run_over_the_machine_memory_stops_before_training(corpus, neox_tokenizer_file, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(preflight, "available_memory", lambda device: (10 * 1024 * 1024, "available RAM"))
    rc, out, err = _run(tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=1), capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: memory: the run needs about 0.")
    assert "activations of micro batch 2 x seq_length 32" in lines[0] and "10.00 MiB" not in lines[0]
    assert "iteration 1" not in out and "model:" not in out  # before the model was built


def test_a_sequence_longer_than_the_data_stops_before_training(corpus, neox_tokenizer_file, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(preflight, "available_memory", lambda device: None)  # only the data rule is under test
    rc, out, err = _run(tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=1, seq=20_000, micro=1),
                        capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "model.seq_length 20000 is longer than the whole train split of " in lines[0]
    assert "a sample needs seq_length + 1): lower seq_length, add data or change split" in lines[0]
    assert "iteration 1" not in out


def test_learned_positions_beyond_the_table_are_refused():
    with pytest.raises(ConfigError, match=r"seq_length=256 \(\+ opt_pos_emb_offset=0\) exceeds "
                                          r"max_position_embeddings=128 .* with learned positions"):
        load_config(REPO / "configs" / "tiny-cpu.yml",
                    overrides=["--pos_emb", "learned", "--seq_length", "256"])
