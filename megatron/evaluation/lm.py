"""``NeoXLM``: our own ``GPTModel`` behind lm_eval's public ``TemplateLM`` API (loglikelihood, rolling
loglikelihood, generate_until), with the attention the model was trained with.

Every rank of a data-parallel run builds the same request lists (lm_eval runs unchanged on each rank with
``rank = 0, world_size = 1``); the model work is what is split: requests are sorted by length (longest first, as
lm_eval's ``hf`` model does), rank ``r`` takes every ``world``-th of them, runs them in batches and the results are
all-gathered back into request order. So every rank returns the full, identical result list and lm_eval's metrics
equal a one-process run's, whatever the number of ranks.

Scoring mirrors lm_eval's ``hf`` model exactly: ``(context + continuation)[-(max_length + 1):][:-1]`` as input,
right padding (a causal model's real positions never see it), log-softmax over the whole (padded) vocabulary in
fp32. Generation is greedy on ``megatron.inference``'s cached decoding (left-padded batches, one KV cache reused
across batches): a plain cache for full attention, the ``uncapped`` SepLLM cache for SepLLM / StreamingLLM models
(initial tokens + every separator + the generate window: the decode rule the model was trained with, which is also
what ``apply_sepllm`` gives an HF model). Models no cache can serve (BiPE, FixLLM, self-adjusting softmax) recompute
the whole sequence each step, one prompt at a time, so padding never shifts their positions or initial tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron.inference.generator import GeneratedTokens, generate_batch
from megatron.inference.kv_cache import KVCacheError, KVCacheSettings, build_kv_cache, model_attention_mode
from megatron.inference.stopping import StopStrings
from megatron.errors import UserInputError

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's default when a task sets no max_gen_toks


class EvalRequestError(UserInputError, ValueError):
    """A request the evaluator cannot serve as asked (e.g. sampling); one line naming the task setting."""


@dataclass(frozen=True)
class DataParallel:
    """Where this process sits among the evaluation ranks (``group`` None = the default process group)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def gather(self, local: list) -> list:
        """Concatenation of every rank's ``local`` list, in rank order (identity on one rank)."""
        if self.world_size == 1:
            return list(local)
        import torch.distributed as dist

        boxes: list = [None] * self.world_size
        dist.all_gather_object(boxes, local, group=self.group)
        return [item for box in boxes for item in box]


class NeoXLM(TemplateLM):
    """lm_eval model over a ``GPTModel``; ``tokenizer`` is a ``megatron.tokenizer.Tokenizer``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 1,
                 max_length: Optional[int] = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 device: str | torch.device = "cpu", dp: DataParallel = DataParallel(),
                 show_progress: Optional[bool] = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: expected >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or model.context.max_positions)
        self.max_gen_toks = int(max_gen_toks)
        self._device = torch.device(device)
        self.dp = dp
        self.show_progress = dp.rank == 0 if show_progress is None else show_progress
        self._decode_cache: Any = None   # built on the first generate_until batch (see generation_cache)
        self._decode_cache_built = False

    # ----------------------------------------------------------------------------------------- lm_eval plumbing
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eod)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.tokenize(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(tokens))

    def get_model_info(self) -> dict:
        """Merged into lm_eval's ``results["config"]``."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "data_parallel_size": self.dp.world_size}

    # ----------------------------------------------------------------------------------------- splitting
    def _split_run(self, n: int, sort_key: Callable[[int], Any], run_batch: Callable[[list[int]], list],
                   desc: str, disable_tqdm: bool) -> list:
        """Sort request indices, run this rank's share in batches, all-gather, return results in request order."""
        order = sorted(range(n), key=sort_key)
        mine = order[self.dp.rank::self.dp.world_size]
        local: list[tuple[int, Any]] = []
        bar = tqdm(total=len(mine), desc=desc, disable=disable_tqdm or not self.show_progress)
        for start in range(0, len(mine), self.batch_size):
            batch = mine[start:start + self.batch_size]
            local.extend(zip(batch, run_batch(batch)))
            bar.update(len(batch))
        bar.close()
        merged = dict(self.dp.gather(local))
        if len(merged) != n:
            raise RuntimeError(f"{desc}: gathered {len(merged)} results for {n} requests")
        return [merged[i] for i in range(n)]

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Right-padded forward of ``rows``; returns logits ``[B, S, V]`` and the row lengths."""
        lengths = [len(r) for r in rows]
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        ids = ids.to(self.device)
        padded = min(lengths) < width
        logits = self.model(ids, attention_mask=mask.to(self.device) if padded else None)
        return logits, lengths

    # ----------------------------------------------------------------------------------------- loglikelihood
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        inputs, conts = [], []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise EvalRequestError("a loglikelihood request has an empty context or continuation after "
                                       "tokenization")
            if len(continuation_enc) > self.max_length:
                raise EvalRequestError(f"a continuation of {len(continuation_enc)} tokens exceeds the model's "
                                       f"maximum length {self.max_length}")
            inputs.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
            conts.append(continuation_enc)

        # requests with the same model input (e.g. the one-token answers of a multiple-choice question) share one row
        groups: dict[tuple, list[int]] = {}
        for i, inp in enumerate(inputs):
            groups.setdefault(tuple(inp), []).append(i)
        unique = list(groups.values())

        def run(batch: list[int]) -> list[list[tuple[float, bool]]]:
            logits, lengths = self._forward([inputs[unique[g][0]] for g in batch])
            out = []
            for row, g in enumerate(batch):
                scores = []
                for i in unique[g]:
                    cont = conts[i]
                    picked = logits[row, lengths[row] - len(cont):lengths[row]]
                    logp = F.log_softmax(picked.float(), dim=-1)
                    target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                    total = float(logp.gather(-1, target.unsqueeze(-1)).sum())
                    scores.append((total, bool((logp.argmax(dim=-1) == target).all())))
                out.append(scores)
            return out

        per_group = self._split_run(len(unique), lambda g: (-len(inputs[unique[g][0]]), tuple(inputs[unique[g][0]])),
                                    run, "loglikelihood requests", disable_tqdm)
        results: list = [None] * len(requests)
        for members, scores in zip(unique, per_group):
            for i, score in zip(members, scores):
                results[i] = score
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of ``max_length`` tokens (lm_eval's ``hf`` rule)."""
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + window)
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, scores):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, end of text or ``max_gen_toks`` tokens."""
        eos = self.tok_decode([self.eot_token_id])
        prepared = []
        for context, gen_kwargs in (req.args for req in requests):
            if not isinstance(gen_kwargs, dict):
                raise EvalRequestError(f"generate_until: generation_kwargs must be a mapping, got {gen_kwargs!r}")
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0.0:
                raise EvalRequestError(f"generate_until: sampling (do_sample={kw.get('do_sample')}, temperature="
                                       f"{kw.get('temperature')}) is not supported; eval.py decodes greedily "
                                       f"(set do_sample: false in the task's generation_kwargs)")
            until = handle_stop_sequences(kw.get("until"), eos=eos)
            max_gen = int(kw["max_gen_toks"])
            if max_gen < 1 or max_gen >= self.max_length:
                raise EvalRequestError(f"generate_until: max_gen_toks = {max_gen} must be >= 1 and below the "
                                       f"model's maximum length {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            prepared.append((ids or [self.prefix_token_id], until, max_gen))

        def run(batch: list[int]) -> list[str]:
            return self._greedy([prepared[i] for i in batch])

        results = self._split_run(len(prepared), lambda i: (-len(prepared[i][0]), i), run,
                                  "generate_until requests", disable_tqdm)
        for req, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    def generation_cache(self) -> Any:
        """The KV cache ``generate_until`` decodes with, built once and reset per batch: ``plain`` for full attention,
        ``uncapped`` for SepLLM / StreamingLLM (the trained decode rule; ``compressed`` would cap the separators) and
        sliding-window models (their rolling window); None for models no cache can serve (decoded by recomputing, one
        prompt at a time)."""
        if not self._decode_cache_built:
            kind = "plain" if model_attention_mode(self.model) == "full" else "uncapped"
            # generation prompts count into the same SepLLM retention totals as the scoring forwards
            retention = getattr(getattr(self.model, "attention_backend", None), "retention", None)
            try:
                self._decode_cache = build_kv_cache(self.model, KVCacheSettings(kind=kind), capacity=self.max_length,
                                                    retention=retention)
            except KVCacheError:
                self._decode_cache = None
            self._decode_cache_built = True
        return self._decode_cache

    def _greedy(self, items: list[tuple[list[int], list[str], int]]) -> list[str]:
        eot = self.eot_token_id
        cache = self.generation_cache()
        out: list[GeneratedTokens] = []
        if cache is not None:
            out = generate_batch(self.model, [ids for ids, _, _ in items], max_new_tokens=[m for _, _, m in items],
                                 eos_id=eot, cache=cache, pad_id=eot,
                                 stop=StopStrings(self.tok_decode, [until for _, until, _ in items]))
        else:
            for ids, until, max_gen in items:
                out.extend(generate_batch(self.model, [ids], max_new_tokens=max_gen, eos_id=eot, recompute=True,
                                          stop=StopStrings(self.tok_decode, [until])))
        return [postprocess_generated_text(self.tok_decode(r.tokens), until, None)
                for r, (_, until, _) in zip(out, items)]


__all__ = ["DEFAULT_MAX_GEN_TOKS", "DataParallel", "EvalRequestError", "NeoXLM"]
