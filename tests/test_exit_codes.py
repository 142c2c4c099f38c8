"""One rule for every tool (``megatron/errors.py``): exit 2 when what the user gave cannot be used (a config key or
value, a flag, or a file the config or command line names: a data prefix, a checkpoint to read, input text), exit 1
when the run itself fails after its inputs were accepted. One table, tool by tool; every case is one ``error:``
line naming what is wrong, and a key given on the command line is named as such."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron.training import pretrain
from train_helpers import make_tiny_corpus, tiny_config, tiny_sepllm_keys

REPO = Path(__file__).resolve().parents[1]


def _entry(path: Path):
    """The ``main(argv) -> exit code`` of a script of the repository (run in this process)."""
    spec = importlib.util.spec_from_file_location(f"entry_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def world(tmp_path_factory, neox_tokenizer_file, pg19_books):
    """A tokenized corpus, a trained 1-step checkpoint, a copy of it with a corrupt weights file, and a training
    YAML for the tiny model."""
    root = tmp_path_factory.mktemp("exit_codes")
    prefix = make_tiny_corpus(root / "data", pg19_books[0], neox_tokenizer_file, chars=20_000)
    cfg = tiny_config(prefix, neox_tokenizer_file, root, train_iters=1, checkpoint__save=str(root / "ckpt"))
    pretrain(cfg)
    corrupt = root / "corrupt"
    shutil.copytree(root / "ckpt", corrupt)
    (corrupt / "global_step1" / "model_states.pt").write_bytes(b"not a checkpoint" * 64)
    config = root / "tiny.yml"
    keys = tiny_sepllm_keys(prefix, neox_tokenizer_file, root)
    keys.update({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "USE_ORIGINAL_FULL_ATTEN": True,
                 "save": str(root / "new_ckpt")})
    config.write_text(yaml.safe_dump(keys))
    (root / "prompts.txt").write_text("Once upon a time\n")
    (root / "a_file").write_text("x")
    return {"root": root, "ckpt": root / "ckpt", "corrupt": corrupt, "config": config, "prefix": prefix}


def _train(w, *extra):
    return _entry(REPO / "train.py")([str(w["config"]), *extra])


def _generate(w, *extra):
    return _entry(REPO / "generate.py")([str(w["config"]), "--text_gen_type", "input-file", "--sample_input_file",
                                         str(w["root"] / "prompts.txt"), "--maximum_tokens", "2", *extra])


def _eval(w, *extra):
    return _entry(REPO / "eval.py")([str(w["config"]), "--eval_tasks", "pg19_local_ppl", "--eval_include_path",
                                     str(REPO / "eval_tasks"), "--eval_limit", "1", *extra])


def _convert(w, input_dir):
    return _entry(REPO / "tools" / "ckpts" / "convert_neox_to_hf.py")(
        ["--input_dir", str(input_dir), "--output_dir", str(w["root"] / "hf_out")])


def _prepare(w, *args):
    from megatron.data.cli_utils import run_cli

    return run_cli(_entry(REPO / "prepare_data.py"), "prepare_data.py", [*args, "-d", str(w["root"] / "prep"),
                                                                          "--no-progress"])


def _deepy_train(w, *extra):
    proc = subprocess.run([sys.executable, str(REPO / "deepy.py"), "train.py", str(w["config"]), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    sys.stderr.write(proc.stderr)
    return proc.returncode


MISSING = "/no/such/checkpoint"
# (case, run, exit code, the error line (regex))
CASES = [
    ("train: missing data prefix", lambda w: _train(w, "--data-path", str(w["root"] / "nowhere_text_document")), 2,
     r"error: data prefix '.*nowhere_text_document' not found"),
    ("deepy train: missing data prefix",
     lambda w: _deepy_train(w, "--data-path", str(w["root"] / "nowhere_text_document")), 2,
     r"error: data prefix '.*nowhere_text_document' not found"),
    ("train: --load does not exist", lambda w: _train(w, "--load", MISSING), 2,
     rf"error: checkpoint path {MISSING} does not exist"),
    ("train: corrupt checkpoint", lambda w: _train(w, "--load", str(w["corrupt"])), 2,
     r"error: checkpoint file .*model_states.pt is corrupt"),
    ("train: key from the command line", lambda w: _train(w, "--iteration", "1"), 2,
     r"^error: command line --iteration=1: key 'iteration' = 1 picks the checkpoint"),
    ("generate: --load does not exist", lambda w: _generate(w, "--load", MISSING), 2,
     rf"error: checkpoint path {MISSING} does not exist"),
    ("generate: corrupt checkpoint", lambda w: _generate(w, "--load", str(w["corrupt"])), 2,
     r"error: checkpoint file .*model_states.pt is corrupt"),
    ("generate: the output cannot be written",
     lambda w: _generate(w, "--load", str(w["ckpt"]), "--sample_output_file", str(w["root"] / "a_file" / "x.jsonl")),
     1, r"^error: .*File exists"),
    ("eval: --load does not exist", lambda w: _eval(w, "--load", MISSING), 2,
     rf"error: checkpoint path {MISSING} does not exist"),
    ("eval: corrupt checkpoint", lambda w: _eval(w, "--load", str(w["corrupt"])), 2,
     r"error: checkpoint file .*model_states.pt is corrupt"),
    ("convert: --input_dir does not exist", lambda w: _convert(w, MISSING), 2,
     rf"convert_neox_to_hf: error: checkpoint path {MISSING} does not exist"),
    ("convert: corrupt checkpoint", lambda w: _convert(w, w["corrupt"]), 2,
     r"convert_neox_to_hf: error: checkpoint file .*model_states.pt is corrupt"),
    ("prepare_data: input not found", lambda w: _prepare(w, "x", "--input", "/no/such/input.txt"), 2,
     r"prepare_data.py: error: input path not found: /no/such/input.txt"),
]


@pytest.mark.parametrize("case,run,code,line", CASES, ids=[c[0] for c in CASES])
def test_exit_code_follows_the_one_rule(world, capsys, monkeypatch, case, run, code, line):
    from megatron.device import quiet_accelerator_probe

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    probe: dict = {}
    quiet_accelerator_probe(probe)       # what the entry points set; undone after the test
    for key, value in probe.items():
        monkeypatch.setenv(key, value)
    got = run(world)
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if re.search(r"(^|: )error: ", l)]
    assert got == code, (case, err[-3000:])
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(line, errors[0]), (line, errors[0])
