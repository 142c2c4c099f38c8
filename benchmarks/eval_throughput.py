"""Requests per second of eval.py's model (``NeoXLM`` over our ``GPTModel``) against lm_eval's own ``hf`` model
(``HFLM``) on the same weights converted to ``GPTNeoXForCausalLM``, measured in the same run on the local PG-19
tasks of ``eval_tasks/`` (offline).

One row per (runner, task): ``requests_per_sec`` counts the model requests lm_eval hands to the runner
(loglikelihood: one per answer choice; rolling: one per document; generate_until: one per document) over the time
spent inside the runner's request method (lm_eval's own task building is not timed); ``ratio_vs_hf`` is ours / hf
(> 1 means eval.py is faster). Each of ``--repeats`` rounds times every (task, runner) once, alternating the
runners, and the best rate of each is kept, so load changes on a shared machine hit both alike. Both runners get
the same batch size; the model is the `configs/tiny-cpu.yml` shape
(or ``--config``) with random weights, full attention by default (``--sepllm`` keeps the config's SepLLM attention;
the hf side then runs ``apply_sepllm`` at batch size 1, see tests/test_eval.py).

Example: ``python benchmarks/eval_throughput.py --limit 24 --json out.json``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/report.py
from report import print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TASKS = ("pg19_local_cloze", "pg19_local_ppl", "pg19_local_gen")
REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny-cpu.yml", help="model config (YAML)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"tasks from eval_tasks/ (default {TASKS})")
    p.add_argument("--limit", type=int, default=24, help="documents per task (default 24, all of them)")
    p.add_argument("--batch", type=int, default=8, help="batch size of both runners (default 8)")
    p.add_argument("--sepllm", action="store_true", help="keep the config's SepLLM attention (default: full)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per task, runners alternating; best rate kept "
                                                          "(default 3)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list to this path")
    return p.parse_args(argv)


class _Timer:
    """Wraps an LM instance's request methods: requests and seconds per request type."""

    def __init__(self, lm: Any) -> None:
        self.seconds: dict[str, float] = {}
        self.requests: dict[str, int] = {}
        for name in REQUEST_METHODS:
            setattr(lm, name, self._wrap(name, getattr(lm, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(requests: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(requests, *args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.requests[name] = self.requests.get(name, 0) + len(requests)
            return out
        return timed

    def rate(self) -> tuple[int, float]:
        n = sum(self.requests.values())
        return n, n / max(sum(self.seconds.values()), 1e-9)


def _build(args: argparse.Namespace, root: Path) -> tuple[Any, Any, Any]:
    """(our loaded model + config, the HF model, the HF tokenizer) from a checkpoint written here."""
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from megatron.config import load_config
    from megatron.checkpoint import load_trained_model
    from megatron.model.gpt import GPTModel
    from megatron.checkpoint.hf.mapping import hf_gpt_neox_config, to_hf_gpt_neox_state_dict

    overrides = [] if args.sepllm else ["--USE_ORIGINAL_FULL_ATTEN", "true"]
    cfg = load_config(args.config, overrides=overrides)
    tok_file = Path(cfg.tokenizer.vocab_file)
    if not tok_file.is_absolute():
        tok_file = REPO / tok_file
    cfg.tokenizer.vocab_file = str(tok_file)
    cfg.model.padded_vocab_size = cfg.model.padded_vocab_size or 50304
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.sepllm)
    step = root / "global_step1"
    step.mkdir(parents=True)
    torch.save(model.state_dict(), step / "model_states.pt")
    (step / "meta.json").write_text(json.dumps({"iteration": 1}))
    (step / "config.yml").write_text(cfg.to_yaml())
    (root / "latest").write_text("global_step1")
    trained = load_trained_model(root)
    hf = GPTNeoXForCausalLM(hf_gpt_neox_config(trained.config.model, eos_token_id=0)).eval()
    hf.load_state_dict(to_hf_gpt_neox_state_dict(trained.model.state_dict(), trained.config.model), strict=True)
    if args.sepllm and trained.config.sepllm.mode != "full":
        from megatron.sepllm.hf.trainingfree import apply_sepllm

        sep = dataclasses.replace(trained.config.sepllm, Layer_num=trained.config.model.num_layers,
                                  USE_SEP_ATTN_KERNEL_ACCELERATOR=False, sep_attention_impl="dense")
        apply_sepllm(hf, sep, attn_impl="sdpa")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), eos_token="<|endoftext|>")
    return trained, hf, tok


def _run(lm: Any, task: str, limit: int) -> tuple[int, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    timer = _Timer(lm)
    simple_evaluate(model=lm, tasks=[task], limit=limit, bootstrap_iters=0, log_samples=False,
                    task_manager=TaskManager(include_path=str(REPO / "eval_tasks"), include_defaults=False),
                    verbosity="ERROR")
    return timer.rate()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from megatron.evaluation.lm import NeoXLM
    from megatron.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        trained, hf, hf_tok = _build(args, Path(tmp))
    c = trained.config
    ours_tok = build_tokenizer(c.tokenizer.tokenizer_type, c.tokenizer.vocab_file, c.tokenizer.merge_file)
    max_len = trained.model.max_positions
    hf_batch = 1 if args.sepllm and c.sepllm.mode != "full" else args.batch
    if args.repeats < 1:
        print(f"error: --repeats = {args.repeats}: expected >= 1", file=sys.stderr)
        return 2
    rows = []
    for task in args.tasks:
        ours = NeoXLM(trained.model, ours_tok, batch_size=args.batch, show_progress=False)
        theirs = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=hf_batch, max_length=max_len, device="cpu")
        _run(ours, task, min(args.limit, 2))            # warm-up (allocator, kernels) for both runners
        _run(theirs, task, min(args.limit, 2))
        hf_rate = our_rate = 0.0
        for _ in range(args.repeats):
            n_hf, rate = _run(theirs, task, args.limit)
            hf_rate = max(hf_rate, rate)
            n_ours, rate = _run(ours, task, args.limit)
            our_rate = max(our_rate, rate)
            if n_hf != n_ours:
                raise RuntimeError(f"{task}: the runners saw {n_ours} and {n_hf} requests")
        rows.append({"runner": "hf", "task": task, "requests": n_hf, "requests_per_sec": hf_rate,
                     "ratio_vs_hf": 1.0})
        rows.append({"runner": "ours", "task": task, "requests": n_ours, "requests_per_sec": our_rate,
                     "ratio_vs_hf": our_rate / hf_rate})
    attention = c.sepllm.mode
    print(f"eval throughput, {c.model.num_layers} layers x hidden {c.model.hidden_size}, max length {max_len}, "
          f"attention {attention}, batch {args.batch} (hf {hf_batch}), threads {torch.get_num_threads()}, "
          f"best of {args.repeats} rounds")
    print_table(rows, [("runner", "runner", "<"), ("task", "task" + " " * 14, "<"), ("requests", "requests", ">"),
                       ("requests_per_sec", "req/s", ">.2f"), ("ratio_vs_hf", "ratio_vs_hf", ">.2f")])
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
