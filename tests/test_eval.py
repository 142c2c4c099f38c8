"""eval.py: lm_eval on our own checkpoints (megatron/evaluation), against lm_eval's own ``hf`` model on the
converted checkpoint, on the local PG-19 tasks shipped in eval_tasks/ (offline)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.config import load_config
from megatron.evaluation.lm import DataParallel
from megatron.evaluation.runner import run_evaluation
from megatron.model.gpt import GPTModel

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval_tasks"
TASKS = ["pg19_local_cloze", "pg19_local_ppl", "pg19_local_gen"]
PYTHIA_SEPS = [15, 13, 32, 2, 28, 27, 209, 186, 187]


def _model_keys(tokenizer_file: Path, sepllm: bool) -> dict:
    keys = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 96,
            "max-position-embeddings": 96, "pos-emb": "rotary", "rotary-pct": 0.25, "gpt-j-residual": True,
            "no-weight-tying": True, "tokenizer-type": "HFTokenizer", "vocab-file": str(tokenizer_file),
            "train_micro_batch_size_per_gpu": 3, "device": "cpu", "precision": "fp32"}
    if sepllm:
        keys.update({"separator_token_ids": PYTHIA_SEPS, "prefill_local_window_size": 6,
                     "generate_local_window_size": 6, "init_tok_max_idx": 2, "sep_attention_impl": "compact"})
    else:
        keys["USE_ORIGINAL_FULL_ATTEN"] = True
    return keys


def _write_checkpoint(root: Path, keys: dict, iteration: int, seed: int) -> Path:
    """A checkpoint in the trainer's layout with weights far from init (so attention really shapes the output)."""
    cfg = load_config(keys)
    cfg.model.padded_vocab_size = 50304
    torch.manual_seed(seed)
    model = GPTModel(cfg.model, cfg.sepllm)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)
    step = root / f"global_step{iteration}"
    step.mkdir(parents=True)
    torch.save(model.state_dict(), step / "model_states.pt")
    (step / "meta.json").write_text(json.dumps({"iteration": iteration}))
    (step / "config.yml").write_text(cfg.to_yaml())
    (root / "latest").write_text(f"global_step{iteration}")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, neox_tokenizer_file):
    root = tmp_path_factory.mktemp("eval_ckpts")
    out = {}
    for name, sep in (("full", False), ("sepllm", True)):
        keys = _model_keys(neox_tokenizer_file, sep)
        ckpt = _write_checkpoint(root / name, keys, 5, seed=1 + sep)
        cfg_file = root / f"{name}.yml"
        cfg_file.write_text(json.dumps(dict(keys, load=str(ckpt))))
        out[name] = cfg_file
    return out


def _ours(cfg_file: Path, tmp_path: Path, *extra: str, dp: DataParallel = DataParallel(), limit: int = 6) -> dict:
    overrides = ["--eval_tasks", *TASKS, "--eval_include_path", str(TASKS_DIR), "--eval_limit", str(limit),
                 "--eval_results_prefix", str(tmp_path / "run"), "--eval_bootstrap_iters", "0",
                 "--eval_log_samples", "true", *extra]
    cfg = load_config(cfg_file, overrides=overrides)
    outcome = run_evaluation(cfg, config_files=[cfg_file], overrides=overrides, dp=dp, include_defaults=False,
                             print_table=dp.rank == 0)
    return outcome.results


def _hf(cfg_file: Path, neox_tokenizer_file: Path, sepllm: bool, limit: int = 6) -> dict:
    """lm_eval's own `hf` model (HFLM) on the converted checkpoint; SepLLM through apply_sepllm."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from megatron.checkpoint import load_trained_model
    from megatron.checkpoint.hf.mapping import hf_gpt_neox_config, to_hf_gpt_neox_state_dict
    from megatron.sepllm.hf.trainingfree import apply_sepllm

    cfg = load_config(cfg_file)
    trained = load_trained_model(cfg.checkpoint.load, config_files=[cfg_file])
    hf = GPTNeoXForCausalLM(hf_gpt_neox_config(trained.config.model, eos_token_id=0)).eval()
    hf.load_state_dict(to_hf_gpt_neox_state_dict(trained.model.state_dict(), trained.config.model), strict=True)
    if sepllm:
        import dataclasses

        sep = dataclasses.replace(trained.config.sepllm, Layer_num=trained.config.model.num_layers,
                                  USE_SEP_ATTN_KERNEL_ACCELERATOR=False, sep_attention_impl="dense")  # HF: mask path
        apply_sepllm(hf, sep, attn_impl="sdpa")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_file), eos_token="<|endoftext|>")
    # HF's batched generation left-pads; with BATCH_ADAPTIVE_INIT_POS off (the training default) the pads would
    # become SepLLM's initial tokens, so the SepLLM reference runs one request at a time
    lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=1 if sepllm else 3, max_length=96, device="cpu")
    return simple_evaluate(model=lm, tasks=TASKS, limit=limit, bootstrap_iters=0, log_samples=True,
                           task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))


def _per_example(results: dict) -> dict:
    """task -> list of per-document responses (log-likelihoods, rolling sums or generated text) in doc order."""
    out = {}
    for task in TASKS:
        rows = sorted(results["samples"][task], key=lambda r: r["doc_id"])
        out[task] = [[resp[0] for resp in row["resps"]] for row in rows]
    return out


def _assert_same(ours: dict, theirs: dict, atol: float) -> None:
    for task in TASKS:
        assert len(ours[task]) == len(theirs[task]) == 6, task
        for a_doc, b_doc in zip(ours[task], theirs[task]):
            for a, b in zip(a_doc, b_doc, strict=True):
                if isinstance(a, str):
                    assert a == b, task
                elif isinstance(a, (list, tuple)):  # (loglikelihood, is_greedy)
                    assert a[0] == pytest.approx(b[0], abs=atol) and bool(a[1]) == bool(b[1]), task
                else:  # rolling loglikelihood: a sum over a whole document (~300 tokens, fp32 roundoff adds up)
                    assert a == pytest.approx(b, abs=atol, rel=1e-6), task


@pytest.mark.parametrize("kind", ["full", "sepllm"])
def test_same_per_example_loglikelihoods_as_lm_eval_hf(kind, checkpoints, neox_tokenizer_file, tmp_path):
    ours = _ours(checkpoints[kind], tmp_path)
    theirs = _hf(checkpoints[kind], neox_tokenizer_file, sepllm=kind == "sepllm")
    _assert_same(_per_example(ours), _per_example(theirs), atol=1e-4)
    for task, metric in (("pg19_local_cloze", "acc,none"), ("pg19_local_ppl", "word_perplexity,none"),
                         ("pg19_local_gen", "exact_match,none")):
        assert ours["results"][task][metric] == pytest.approx(theirs["results"][task][metric], rel=1e-5)
    # results file: lm_eval's layout plus ours
    saved = json.loads((tmp_path / "run_eval_results.json").read_text())
    assert set(saved["results"]) == set(TASKS) and saved["iteration"] == 5
    assert saved["checkpoint_dir"].endswith("global_step5") and saved["n-shot"]["pg19_local_cloze"] == 0
    assert saved["model"]["attention"] == ("sepllm" if kind == "sepllm" else "full")
    assert "samples" not in saved and (tmp_path / "run_eval_results_samples_pg19_local_ppl.jsonl").is_file()
    if kind == "sepllm":
        ret = saved["sepllm_retention"]
        assert 0.0 < ret["attn_map_retention/total"] < 0.9 and ret["forward_calls"] > 0
        # the same weights under full attention score differently: the SepLLM mask really ran on both sides
        full = _ours(checkpoints[kind], tmp_path, "--USE_ORIGINAL_FULL_ATTEN", "true")
        diffs = [abs(a[0] - b[0]) for a, b in zip(_per_example(full)["pg19_local_ppl"],
                                                  _per_example(ours)["pg19_local_ppl"])]
        assert max(diffs) > 1e-2
    else:
        assert saved["sepllm_retention"] is None


def _gen_requests(n: int = 6, max_gen: int = 16) -> list:
    """lm_eval generate_until requests over the first ``n`` PG-19 prompts (ragged lengths)."""
    from lm_eval.api.instance import Instance

    docs = [json.loads(line) for line in (TASKS_DIR / "pg19_local.jsonl").read_text().splitlines()[:n]]
    kwargs = {"until": ["\n"], "max_gen_toks": max_gen, "do_sample": False}
    return [Instance(request_type="generate_until", doc=d, arguments=(d["prompt"], dict(kwargs)), idx=0)
            for d in docs]


def _neox_lm(trained, batch_size: int = 3):
    from megatron.evaluation.lm import NeoXLM
    from megatron.tokenizer import build_tokenizer

    tok = trained.config.tokenizer
    return NeoXLM(trained.model, build_tokenizer(tok.tokenizer_type, tok.vocab_file, tok.merge_file),
                  batch_size=batch_size, show_progress=False)


@pytest.mark.parametrize("exclude_diagonal", ["true", "false"])
def test_generate_until_decodes_with_the_generate_window(exclude_diagonal, checkpoints, neox_tokenizer_file):
    """A decode window (3) unlike the prefill window (6): cached generation follows the decode rule, as lm_eval's
    `hf` model under apply_sepllm does (mask-only generation), and differs from decoding with the prefill window.
    EXCLUDE_DIAGONAL=False widens the prefill window only (a decode query sees the last 3 keys either way)."""
    import dataclasses

    from lm_eval.models.huggingface import HFLM
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from megatron.checkpoint import load_trained_model
    from megatron.checkpoint.hf.mapping import hf_gpt_neox_config, to_hf_gpt_neox_state_dict
    from megatron.sepllm.hf.trainingfree import apply_sepllm

    load = load_config(checkpoints["sepllm"]).checkpoint.load
    diag = ["--EXCLUDE_DIAGONAL", exclude_diagonal]
    trained = load_trained_model(load, config_files=[checkpoints["sepllm"]],
                                 overrides=["--generate_local_window_size", "3", *diag])
    assert trained.config.sepllm.generate_local_window_size == 3
    assert trained.config.sepllm.prefill_local_window_size == 6
    assert trained.config.sepllm.EXCLUDE_DIAGONAL is (exclude_diagonal == "true")
    lm = _neox_lm(trained)
    assert lm.generation_cache().settings.kind == "uncapped"
    ours = lm.generate_until(_gen_requests())

    hf = GPTNeoXForCausalLM(hf_gpt_neox_config(trained.config.model, eos_token_id=0)).eval()
    hf.load_state_dict(to_hf_gpt_neox_state_dict(trained.model.state_dict(), trained.config.model), strict=True)
    sep = dataclasses.replace(trained.config.sepllm, Layer_num=trained.config.model.num_layers,
                              USE_SEP_ATTN_KERNEL_ACCELERATOR=False, sep_attention_impl="dense")
    apply_sepllm(hf, sep, attn_impl="sdpa")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_file), eos_token="<|endoftext|>")
    theirs = HFLM(pretrained=hf, tokenizer=tok, batch_size=1, max_length=96, device="cpu").generate_until(
        _gen_requests(), disable_tqdm=True)
    assert ours == theirs
    assert sum(len(t) for t in ours) > 6 * 10      # real continuations, not empty strings

    assert lm.generation_cache().sizes["local_size"] == [3, 3]
    same_windows = load_trained_model(load, config_files=[checkpoints["sepllm"]], overrides=diag)
    assert _neox_lm(same_windows).generate_until(_gen_requests()) != ours


def test_generation_prompts_count_into_the_retention_totals(checkpoints):
    """Cached generation adds each prompt's SepLLM counts (padding excluded) to the model's retention tracker: the
    totals equal the model's own forward over every prompt alone."""
    from megatron.checkpoint import load_trained_model
    from megatron.sepllm.attention.retention import RetentionStats

    trained = load_trained_model(load_config(checkpoints["sepllm"]).checkpoint.load,
                                 config_files=[checkpoints["sepllm"]])
    backend = trained.model.attention_backend
    lm = _neox_lm(trained)
    backend.retention = RetentionStats(backend.num_layers)
    lm.generation_cache()                       # built against the tracker the model holds now
    requests = _gen_requests(max_gen=4)
    lm.generate_until(requests)
    got = backend.retention.counts()

    backend.retention = RetentionStats(backend.num_layers)
    with torch.no_grad():
        for req in requests:
            ids = lm.tok_encode(req.args[0])
            trained.model(torch.tensor([ids]))
    want = backend.retention.counts()
    assert got["kv"] == want["kv"] and got["attn_map"] == want["attn_map"]
    assert got["forward_calls"] == 2 and want["forward_calls"] == 6      # 6 prompts in 2 batches of 3


def test_generate_until_without_a_cache_recomputes_each_prompt(neox_tokenizer_file, tmp_path):
    """BiPE has no KV cache: each prompt is decoded alone by recomputing the sequence; the text equals an
    independent greedy loop over the full forward."""
    from megatron.checkpoint import load_trained_model

    keys = dict(_model_keys(neox_tokenizer_file, sepllm=True), USE_BiPE=True, BiPE_seps=PYTHIA_SEPS)
    trained = load_trained_model(_write_checkpoint(tmp_path / "bipe", keys, 5, seed=3))
    lm = _neox_lm(trained)
    assert lm.generation_cache() is None
    requests = _gen_requests(n=3, max_gen=6)
    got = lm.generate_until(requests)
    want = []
    with torch.no_grad():
        for req in requests:
            ids = lm.tok_encode(req.args[0])
            new: list[int] = []
            while len(new) < 6:
                tok = int(trained.model(torch.tensor([ids + new]))[0, -1].argmax())
                if tok == lm.eot_token_id:
                    break
                new.append(tok)
                if "\n" in lm.tok_decode(new):
                    break
            want.append(lm.tok_decode(new).split("\n")[0])
    assert got == want and any(want)


def _dp_rank(rank: int, world: int, cfg_file: str, out_dir: str) -> None:
    results = _ours(Path(cfg_file), Path(out_dir), dp=DataParallel(rank=rank, world_size=world))
    if rank == 0:
        Path(out_dir, "per_example.json").write_text(json.dumps(_per_example(results)))


def test_two_data_parallel_ranks_give_the_one_process_results(checkpoints, tmp_path):
    from parallel_spawn import run_distributed

    one = _ours(checkpoints["sepllm"], tmp_path / "dp1")
    run_distributed(_dp_rank, 2, str(checkpoints["sepllm"]), str(tmp_path / "dp2"), timeout=300)
    two = json.loads((tmp_path / "dp2" / "per_example.json").read_text())
    _assert_same(two, _per_example(one), atol=1e-5)
    saved1 = json.loads((tmp_path / "dp1" / "run_eval_results.json").read_text())
    saved2 = json.loads((tmp_path / "dp2" / "run_eval_results.json").read_text())
    for task in TASKS:
        for metric, value in saved1["results"][task].items():
            if isinstance(value, float):
                assert saved2["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    # retention counts are summed over both ranks: the same totals as one process
    r1, r2 = saved1["sepllm_retention"], saved2["sepllm_retention"]
    assert r2["attn_map_retention/total"] == pytest.approx(r1["attn_map_retention/total"], rel=1e-9)


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "deepy.py"), str(REPO / "eval.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_runs_through_deepy_and_writes_results(checkpoints, tmp_path):
    proc = _run_cli(str(checkpoints["full"]), "--eval_tasks", "pg19_local_cloze", "pg19_local_ppl",
                    "--eval_include_path", str(TASKS_DIR), "--eval_limit", "2", "--eval_num_fewshot", "1",
                    "--eval_results_prefix", "out/r", "--iteration", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pg19_local_cloze" in proc.stdout and "|Tasks" in proc.stdout.replace(" ", "")
    # which checkpoint it read, first; none of lm_eval's notes about our task files
    assert re.search(r"^eval: iteration 5 from \S+/global_step5, attention full, device cpu$", proc.stdout, re.M)
    assert "is defined, but" not in proc.stderr and "Custom kwargs" not in proc.stderr
    saved = json.loads((tmp_path / "out" / "r_eval_results.json").read_text())
    assert saved["n-shot"]["pg19_local_cloze"] == 1 and saved["config"]["limit"] == 2
    assert saved["n-samples"]["pg19_local_ppl"]["effective"] == 2 and saved["iteration"] == 5


@pytest.mark.parametrize("args, message", [
    (["--eval_tasks", "pg19_local_clozze"], r"key 'eval_tasks': unknown task\(s\) 'pg19_local_clozze' \(did you "
                                            r"mean 'pg19_local_cloze'"),
    (["--eval_tasks", "pg19_local_cloze", "--load", "/nonexistent/ckpt"], r"checkpoint path /nonexistent/ckpt does "
                                                                         r"not exist"),
    (["--eval_tasks", "pg19_local_cloze", "--iteration", "7"], r"no complete checkpoint for iteration 7 in .*"
                                                              r"available iterations: \[5\]"),
    (["--eval_tasks", "pg19_local_cloze", "--load", "null", "--save", "null"], r"eval.py needs key 'load' \(or "
                                                                                r"'save'\)"),
    (["--eval_limit", "0"], r"key 'eval_limit': expected a value >= 1, got 0"),
])
def test_bad_input_is_one_line_exit_2(args, message, checkpoints, tmp_path):
    import re

    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), str(checkpoints["full"]), "--eval_include_path",
                           str(TASKS_DIR), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
