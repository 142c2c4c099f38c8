"""Forward+backward step time of ``GPTModel`` against Hugging Face ``GPTNeoXForCausalLM`` with the same weights.

Every variant is timed in the same run as its baseline and reported as a ratio (``speedup`` = baseline time / ours;
> 1 means ours is faster). Rows:

* ``pythia``  -- Pythia-shaped model (parallel residual, rotary 0.25) vs HF GPT-NeoX (sdpa attention);
* ``llama``   -- Llama-shaped model (RMSNorm, SwiGLU, GQA) vs HF Llama (sdpa attention);
* ``ckpt``    -- ours with activation checkpointing vs ours without (the cost of recomputation);
* ``padded``  -- ours with a left-padded 2-D attention mask vs ours without padding (the masked-SDPA cost).

Example: ``python benchmarks/model_step.py --layers 4 --hidden 256 --seq 256 --batch 2 --json out.json``
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron.config.derived import intermediate_size_for  # noqa: E402
from megatron.config.model import ModelConfig  # noqa: E402
from megatron.model import GPTModel, lm_loss  # noqa: E402
from megatron.checkpoint.hf.mapping import (hf_gpt_neox_config, hf_llama_config,  # noqa: E402
                                            to_hf_gpt_neox_state_dict, to_hf_llama_state_dict)

sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmarks/report.py
from report import print_table, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="number of transformer layers (default 4)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8; Llama rows use heads/4 KV heads)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch size (default 2)")
    p.add_argument("--vocab", type=int, default=8192,
                   help="padded vocabulary size (default 8192 so the layers, not the LM head, dominate; Pythia: 50304)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions per measurement; median reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per measurement (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list to this path")
    return p.parse_args(argv)


def time_pair(fns: tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]],
              params: tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]], device: str, warmup: int,
              repeats: int) -> tuple[float, float]:
    """Median seconds of a forward (returning a loss) + backward for two variants, measured alternately so that
    load from other processes on a shared machine hits both the same way."""
    def step(i: int) -> float:
        for p in params[i]:
            p.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fns[i]().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        step(0), step(1)
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            times[i].append(step(i))
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("error: this benchmark needs transformers (pip install -r requirements/requirements.txt)")
        return 1
    from tqdm import tqdm

    torch.manual_seed(0)
    dev = args.device
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=dev)
    inp, labels = ids[:, :-1], ids[:, 1:]
    mask = torch.ones_like(inp)
    mask[0, : args.seq // 4] = 0
    pythia = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                         seq_length=args.seq, pos_emb="rotary", rotary_pct=0.25, gpt_j_residual=True,
                         no_weight_tying=True, padded_vocab_size=args.vocab)
    llama = dataclasses.replace(pythia, num_kv_heads=max(1, args.heads // 4), rotary_pct=1.0, norm="rmsnorm",
                                activation="swiglu", gpt_j_residual=False, use_bias_in_attn_linear=False,
                                # Llama's width (8/3 x hidden rounded up to 256) in GPT-NeoX's intermediate_size
                                intermediate_size=intermediate_size_for(256 * -(-(8 * args.hidden // 3) // 256),
                                                                        "swiglu"),
                                use_bias_in_mlp=False, use_bias_in_norms=False)

    def ours_loss(model: GPTModel, attention_mask=None) -> Callable[[], torch.Tensor]:
        return lambda: lm_loss(model(inp, attention_mask=attention_mask), labels)

    def hf_loss(model) -> Callable[[], torch.Tensor]:
        return lambda: lm_loss(model(input_ids=inp).logits, labels)

    rows = []
    plan = ["pythia", "llama", "ckpt", "padded"]
    for name in tqdm(plan, desc="benchmark", unit="row"):
        if name in ("pythia", "llama"):
            cfg = pythia if name == "pythia" else llama
            ours = GPTModel(cfg).to(dev).train()
            if name == "pythia":
                hf = transformers.GPTNeoXForCausalLM(hf_gpt_neox_config(cfg, attn_implementation="sdpa"))
                hf.load_state_dict(to_hf_gpt_neox_state_dict(ours.state_dict(), cfg))
            else:
                hf = transformers.LlamaForCausalLM(hf_llama_config(cfg, attn_implementation="sdpa"))
                hf.load_state_dict(to_hf_llama_state_dict(ours.state_dict(), cfg))
            hf = hf.to(dev).train()
            base, mine = time_pair((hf_loss(hf), ours_loss(ours)), (list(hf.parameters()), list(ours.parameters())),
                                   dev, args.warmup, args.repeats)
            baseline = f"HF {type(hf).__name__} (sdpa)"
        elif name == "ckpt":
            plain = GPTModel(pythia).to(dev).train()
            ck = GPTModel(dataclasses.replace(pythia, checkpoint_activations=True)).to(dev).train()
            base, mine = time_pair((ours_loss(plain), ours_loss(ck)), (list(plain.parameters()), list(ck.parameters())),
                                   dev, args.warmup, args.repeats)
            baseline = "ours, no checkpointing"
        else:
            model = GPTModel(pythia).to(dev).train()
            params = list(model.parameters())
            base, mine = time_pair((ours_loss(model), ours_loss(model, mask)), (params, params), dev, args.warmup,
                                   args.repeats)
            baseline = "ours, no padding mask"
        rows.append({"variant": name, "baseline": baseline, "ours_ms": round(mine * 1e3, 2),
                     "baseline_ms": round(base * 1e3, 2), "speedup": round(base / mine, 3),
                     "tokens_per_s": round(args.batch * args.seq / mine, 1), "device": dev,
                     "layers": args.layers, "hidden": args.hidden, "seq": args.seq, "batch": args.batch})

    print(f"\nfwd+bwd per step, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, batch {args.batch}, "
          f"{dev}, median of {args.repeats}")
    print_table(rows, [("variant", "variant", "<"), ("baseline", "baseline" + " " * 24, "<"),
                       ("ours_ms", "ours ms", ">.1f"), ("baseline_ms", "base ms", ">.1f"), ("speedup", "speedup", ">.3f"),
                       ("tokens_per_s", "tok/s", ">.0f")])
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
