"""Bad input to the config / launch / data entry points (issue 9, section 3): one table, one line, the right exit code.

Every row runs an entry point in-process (``deepy.main``, ``train.main``, ``preprocess_data.main``, or an API call)
and asserts the exit code, a substring of the single message line, and what must (not) be left on disk afterwards:
no resolved config for a refused launch, no temp config after a run without ``log_dir``, no checkpoint for a run
refused before training. One row runs ``deepy.py --help`` as a subprocess with an empty PATH (no venv on PATH).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny-cpu.yml"


def _load_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def env(tmp_path, monkeypatch, capsys, pg19_dir, neox_tokenizer_file):
    """Runs entry points from the repo root with stdout/stderr captured; temp files land in ``tmp_path/tmp``."""
    monkeypatch.chdir(REPO)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    deepy = _load_module("deepy_under_test", REPO / "deepy.py")
    train = _load_module("train_under_test", REPO / "train.py")
    pre = _load_module("preprocess_under_test", REPO / "tools" / "datasets" / "preprocess_data.py")
    ns = types.SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch, capsys=capsys, deepy=deepy, train=train,
                               pre=pre, book=sorted(pg19_dir.glob("*.txt"))[0], neox=neox_tokenizer_file)
    return ns


def _logs(e) -> list[str]:
    return ["--log_dir", str(e.tmp / "logs")]


# --------------------------------------------------------------------------------------------- the cases
def _deepy(*args: str, logs: bool = True) -> Callable[[Any], int]:
    return lambda e: e.deepy.main(["train.py", TINY, *args, *(_logs(e) if logs else []), "--dry-run"])


def _no_resolved_config(e) -> None:
    assert not (e.tmp / "logs" / "resolved_config.yml").exists()


def _resolved(e):
    from megatron.config import load_config

    return load_config(str(e.tmp / "logs" / "resolved_config.yml"))


def _token_ids_beyond_vocab(e) -> int:
    """Data tokenized with the 20B tokenizer, trained with the 512-id character tokenizer."""
    from train_helpers import make_tiny_corpus

    prefix = make_tiny_corpus(e.tmp / "data", e.book, e.neox, chars=3000)
    cfg = {"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "seq-length": 16, "train-iters": 2,
           "train_micro_batch_size_per_gpu": 1, "data-path": prefix, "split": "80,10,10", "num_workers": 0,
           "tokenizer-type": "CharLevelTokenizer", "device": "cpu", "save": str(e.tmp / "ckpt"),
           "log_dir": str(e.tmp / "logs"), "eval-iters": 0, "do_test": False}
    path = e.tmp / "char.yml"
    path.write_text(yaml.safe_dump(cfg))
    e.expect = f"data {prefix}: max token id "
    return e.train.main([str(path)])


def _nothing_trained(e) -> None:
    assert not list((e.tmp / "ckpt").glob("global_step*")) if (e.tmp / "ckpt").exists() else True
    from megatron.data.token_range import token_range

    cached = token_range(e.expect.split()[1].rstrip(":"))  # the scan result was cached next to the data
    assert cached.max_id is not None and cached.max_id >= 512


def _visible_gpus(n: int, *args: str) -> Callable[[Any], int]:
    def run(e) -> int:
        e.monkeypatch.setattr("megatron.device.visible_gpu_count", lambda: n)
        return _deepy(*args)(e)

    return run


def _yaml_global_batch_on_3(e) -> int:
    path = e.tmp / "batch.yml"
    path.write_text("train_batch_size: 2\ntrain_micro_batch_size_per_gpu: 2\ngradient_accumulation_steps: 1\n")
    return e.deepy.main(["train.py", TINY, str(path), "--num_gpus", "3", *_logs(e), "--dry-run"])


def _scalar_list_yaml(e) -> int:
    path = e.tmp / "paths.yml"
    path.write_text("data-path: null\ntrain-data-paths: data/x_text_document\n")
    return e.deepy.main(["train.py", TINY, str(path), "--valid-data-paths", "data/v_text_document", *_logs(e),
                         "--dry-run"])


def _scalar_list_loaded(e) -> None:
    cfg = _resolved(e)
    assert cfg.data.train_data_paths == ["data/x_text_document"]
    assert cfg.data.valid_data_paths == ["data/v_text_document"]


def _saved_config_reloads_same_model(e) -> int:
    from megatron.config import load_config

    cfg = load_config(TINY)
    cfg.model.padded_vocab_size = 50304  # what the trainer fills in from the tokenizer before saving config.yml
    path = e.tmp / "config.yml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again.model == cfg.model and again.model.padded_vocab_size == 50304
    return 0


def _reference_doc_in_sync(e) -> int:
    from megatron.config.docs import DEFAULT_OUTPUT, render_reference

    text = DEFAULT_OUTPUT.read_text(encoding="utf-8")
    assert text == render_reference()
    rows = [line for line in text.splitlines() if line.startswith(("| `model_parallel_size`",
                                                                  "| `pipe_parallel_size`",
                                                                  "| `sequence_parallel`"))]
    assert len(rows) == 3 and not any("not supported" in row.lower() for row in rows), rows
    print("parallel rows documented as supported")
    return 0


def _no_temp_config(e) -> None:
    assert list((e.tmp / "tmp").glob("sepllm-config-*")) == []


def _preprocess(*flags: str, ftfy: Any = "absent") -> Callable[[Any], int]:
    def run(e) -> int:
        text = e.tmp / "in.txt"
        text.write_text("caf\u00c3\u00a9 au lait\n", encoding="utf-8")  # "café" as UTF-8 read as Latin-1
        if ftfy == "absent":
            e.monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy -> ImportError
        else:
            e.monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=ftfy))
        return e.pre.main(["--input", str(text), "--output-prefix", str(e.tmp / "out"), "--tokenizer-type",
                           "CharLevelTokenizer", "--no-progress", *flags])

    return run


def _no_preprocess_output(e) -> None:
    assert not list(e.tmp.glob("out*"))


def _ftfy_applied(e) -> None:
    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("CharLevelTokenizer", None, None)
    ds = MMapIndexedDataset(str(e.tmp / "out_text_document"))
    assert ds.num_documents == 1 and list(ds[0]) == tok.tokenize("caf\u00e9 au lait\n")


def _help_subprocess_without_path(e) -> int:
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", TINY, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PATH": "", "HOME": os.environ.get("HOME", "/tmp")})
    print(proc.stdout, end="")
    print(proc.stderr, end="", file=sys.stderr)
    return proc.returncode


def _fix_mojibake(text: str) -> str:
    return text.replace("\u00c3\u00a9", "\u00e9")


# id, run, exit code, substring of the output (stderr for errors, stdout otherwise), check afterwards
CASES: list[tuple[str, Callable[[Any], int], int, str, Callable[[Any], None]]] = [
    ("token-ids-beyond-vocab", _token_ids_beyond_vocab, 2, ">= vocabulary size 512 of the tokenizer "
     "(CharLevelTokenizer)", _nothing_trained),
    ("tp-not-dividing-heads", _deepy("--model-parallel-size", "3", "--num_gpus", "3"), 2,
     "num_attention_heads = 4 is not divisible by model_parallel_size = 3", _no_resolved_config),
    ("tp-not-dividing-kv-heads", _deepy("--num-attention-heads", "8", "--num_kv_heads", "2",
                                        "--model-parallel-size", "4", "--num_gpus", "4"), 2,
     "num_kv_heads = 2 is not divisible by model_parallel_size = 4", _no_resolved_config),
    ("pp-with-zero2", _deepy("--pipe-parallel-size", "2", "--num_gpus", "2", "--zero_optimization.stage", "2"), 2,
     "zero_optimization.stage = 2 with pipe_parallel_size = 2", _no_resolved_config),
    ("num-gpus-beyond-visible", _visible_gpus(2, "--num_gpus", "3"), 2,
     "num_gpus=3, but only 2 CUDA device(s) are visible", _no_resolved_config),
    ("cpu-only-num-gpus-3", _visible_gpus(0, "--num_gpus", "3"), 0,
     "layout: world size 3 = dp 3 x tp 1 x pp 1 | global batch 12 = micro 4 x accum 1 x dp 3",
     lambda e: _resolved(e).parallel.world_size == 3 or pytest.fail("world size not 3")),
    ("world-size-not-divisible", _deepy("--num_gpus", "3", "--model-parallel-size", "2"), 2,
     "world size 3 is not divisible by model_parallel_size x pipe stages = 2 x 1 = 2", _no_resolved_config),
    ("batch-triple-for-2-ranks", _deepy("--num_gpus", "2", "--train_batch_size", "8",
                                        "--train_micro_batch_size_per_gpu", "4", "--gradient_accumulation_steps",
                                        "1"), 0,
     "layout: world size 2 = dp 2 x tp 1 x pp 1 | global batch 8 = micro 4 x accum 1 x dp 2",
     lambda e: _resolved(e).training.train_batch_size == 8 or pytest.fail("global batch not kept")),
    ("yaml-global-batch-not-fitting", _yaml_global_batch_on_3, 2,
     "inconsistent batch sizes: train_batch_size=2 but train_micro_batch_size_per_gpu=2 x "
     "gradient_accumulation_steps=1 x data-parallel size 3 = 6", _no_resolved_config),
    ("launcher-from-this-interpreter", _deepy("--num_gpus", "2"), 0,
     f"command: {sys.executable} -m deepspeed.launcher.runner --num_gpus 2", lambda e: None),
    ("deepy-help-after-config", lambda e: e.deepy.main(["train.py", TINY, "--help"]), 0,
     "usage: python deepy.py SCRIPT.py CONFIG.yml", _no_temp_config),
    ("train-help-after-config", lambda e: e.train.main([TINY, "--help"]), 0,
     "documented in docs/config_reference.md", lambda e: None),
    ("help-without-venv-on-path", _help_subprocess_without_path, 0, "docs/config_reference.md", lambda e: None),
    ("preprocess-dataset-impl-lazy", _preprocess("--dataset-impl", "lazy"), 2,
     "preprocess_data.py: error: --dataset-impl lazy: only mmap is supported", _no_preprocess_output),
    ("preprocess-ftfy-missing", _preprocess("--ftfy"), 2,
     "preprocess_data.py: error: --ftfy needs the ftfy package", _no_preprocess_output),
    ("preprocess-neox-flags", _preprocess("--dataset-impl", "mmap", "--ftfy", "--num-docs", "1",
                                          ftfy=_fix_mojibake), 0,
     "1 documents, 13 tokens", _ftfy_applied),
    ("scalar-for-list-key", _scalar_list_yaml, 0, "layout: world size 1", _scalar_list_loaded),
    ("saved-config-same-model", _saved_config_reloads_same_model, 0, "", lambda e: None),
    ("reference-doc-parallel-rows", _reference_doc_in_sync, 0, "parallel rows documented as supported",
     lambda e: None),
    ("no-temp-config-left", _deepy("--log_dir", "null", "--save", "null", "--tensorboard-dir", "null", logs=False),
     0, "(temporary, removed on exit; set log_dir to keep it)",
     _no_temp_config),
]


@pytest.mark.parametrize("run, code, message, after", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(env, run, code, message, after):
    rc = run(env)
    out, err = env.capsys.readouterr()
    assert rc == code, (out[-2000:], err[-2000:])
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(("error: ", "preprocess_data.py: error: ")), err
        assert message in lines[0] and "Traceback" not in err
    else:
        assert message in out, out[-2000:]
    after(env)
