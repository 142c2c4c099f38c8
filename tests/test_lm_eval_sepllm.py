"""lm_eval integration (megatron/sepllm/hf/lm_eval_model.py, tools/sepllm/lm_eval_sepllm.py), fully offline on a tiny
random Llama saved with the GPT-2 tokenizer and the local PG-19 task YAMLs under tests/fixtures/lm_eval."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
INCLUDE = REPO / "tests" / "fixtures" / "lm_eval"


def _load_cli():
    spec = importlib.util.spec_from_file_location("lm_eval_sepllm_cli", REPO / "tools" / "sepllm" / "lm_eval_sepllm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, gpt2_tokenizer_file):
    """A 2-layer Llama whose vocabulary covers both the GPT-2 tokenizer and the Llama-3 separator ids (128000)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(gpt2_tokenizer_file),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = LlamaConfig(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=256, bos_token_id=128000, eos_token_id=50256, pad_token_id=50256)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_neox_dir(tmp_path_factory, neox_tokenizer_file):
    """A 2-layer GPT-NeoX with the GPT-NeoX-20B tokenizer (Pythia's vocabulary, padded to 50304)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_neox")
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(neox_tokenizer_file), eos_token="<|endoftext|>",
                                  pad_token="<|padding|>")
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=256, eos_token_id=0, pad_token_id=1)
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)          # the task YAMLs name their data relative to the repository root


def _evaluate(lm, tasks, limit):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False,
                           task_manager=TaskManager(include_path=str(INCLUDE), include_defaults=False))


@pytest.mark.slow
def test_both_reference_configs_run_offline_and_report_retention(tiny_llama_dir, reference_configs_dir, in_repo, capsys):
    from megatron.sepllm.hf.lm_eval_model import SepLLMHFLM

    ref = reference_configs_dir
    # SepLLM: windows shrunk so the short PG-19 sentences are really sparsified
    lm = SepLLMHFLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32", batch_size=4,
                    sepllm_config=str(ref / "llama3_sepllm_a3_n256.yml"),
                    sepllm_overrides="Layer_num=2;prefill_local_window_size=4;generate_local_window_size=4")
    res = _evaluate(lm, ["sepllm_pg19_mc", "sepllm_pg19_gen"], limit=4)
    assert "exact_match,none" in res["results"]["sepllm_pg19_gen"]
    mask_stats = lm.sepllm_retention()["mask_path"]
    # 8 loglikelihood requests in 2 batches of 4 + one generate batch of 4 (prefill + decode steps)
    assert mask_stats["mode"] == "sepllm" and mask_stats["sequences"] == 3
    assert mask_stats["forward_calls"] > 3
    kv = mask_stats["final_step_kv_retention"]
    assert 0 < kv["kept"] < kv["total"] and len(kv["per_layer_ratio"]) == 2
    assert "SepLLM[sepllm] final-step KV retention" in capsys.readouterr().out
    # the reported accuracy is that of this model's own scores on the first 4 documents, scored here one request at
    # a time (lm_eval batched and padded them): a batch- or padding-dependent mask path or a wrong doc set fails
    from lm_eval.api.instance import Instance

    docs = [json.loads(line) for line in (INCLUDE / "pg19_sentences.jsonl").read_text().splitlines()[:4]]
    correct = 0
    for doc in docs:
        scores = [lm.loglikelihood([Instance(request_type="loglikelihood", doc=doc, arguments=(doc["context"], choice),
                                             idx=0)])[0][0] for choice in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert res["results"]["sepllm_pg19_mc"]["acc,none"] == correct / len(docs)

    # StreamingLLM a=3, n=256 as shipped (only Layer_num overridden): sequences this short keep every key
    lm = SepLLMHFLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32", batch_size=4,
                    sepllm_config=str(ref / "llama3_streamingllm_a3_n256.yml"), sepllm_overrides="Layer_num=2")
    _evaluate(lm, ["sepllm_pg19_mc"], limit=4)
    stats = lm.sepllm_retention()["mask_path"]
    assert stats["mode"] == "streamingllm"
    assert stats["final_step_kv_retention"]["ratio"] == 1.0 == stats["prefill_attention_map_retention"]["ratio"]


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_mask_path_loglikelihoods_equal_direct_masked_forward(kind, request, reference_configs_dir, tmp_path):
    """The numbers lm_eval scores are those of the SepLLM-masked model (not of the plain one)."""
    from lm_eval.api.instance import Instance

    from megatron.sepllm.attention import rules
    from megatron.sepllm.hf.lm_eval_model import SepLLMHFLM

    if kind == "llama":
        model_dir = request.getfixturevalue("tiny_llama_dir")
        config = reference_configs_dir / "llama3_sepllm_a3_n256.yml"
    else:
        model_dir = request.getfixturevalue("tiny_neox_dir")
        config = tmp_path / "pythia_sepllm.yml"          # Pythia separators (spec §1.1), a=3
        config.write_text("Layer_num: 2\nseparator_token_ids: [15, 13, 32, 2, 28, 27, 209, 186, 187]\n"
                          "PADDING_ID: 1\ninit_tok_max_idx: 2\nprefill_local_window_size: 8\n")
    lm = SepLLMHFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=2,
                    sepllm_config=str(config), sepllm_overrides={"Layer_num": 2, "prefill_local_window_size": 3})
    ctx, cont = "Every part had been filled, and all that", " was lacking was a march."
    req = Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)
    (score, _), = lm.loglikelihood([req])
    ctx_ids, cont_ids = lm.tok_encode(ctx), lm.tok_encode(cont)
    ids = torch.tensor([ctx_ids + cont_ids])[:, :-1]
    seps = lm.sepllm_handle.settings.separator_ids
    allowed = rules.allowed_mask(rules.global_key_bitmap(ids, seps, 3, torch.zeros(1, dtype=torch.long)), 3)
    lm.sepllm_handle.remove()
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=allowed.unsqueeze(1)).logits.log_softmax(-1)
    target = torch.tensor(cont_ids)
    expected = logits[0, -len(cont_ids):].gather(-1, target[:, None]).sum()
    assert abs(score - float(expected)) < 1e-4
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits.log_softmax(-1)[0, -len(cont_ids):].gather(-1, target[:, None]).sum()
    assert abs(score - float(plain)) > 1e-4


@pytest.mark.slow
def test_cli_sepcache_generation_and_mask_path(tiny_llama_dir, reference_configs_dir, in_repo, tmp_path, capsys):
    cli = _load_cli()
    out = tmp_path / "results.json"
    rc = cli.main(["--model-path", str(tiny_llama_dir),
                   "--sepllm-config", str(reference_configs_dir / "llama3_sepllm_a3_n256.yml"),
                   "--sepllm-override", "Layer_num=2", "--sepllm-override", "prefill_local_window_size=4",
                   "--tasks", "sepllm_pg19_gen", "--include-path", str(INCLUDE), "--batch-size", "4",
                   "--limit", "4", "--device", "cpu", "--sepcache", "--init-cache-size", "2",
                   "--sep-cache-size", "4", "--local-size", "4", "--cache-size", "12", "--output", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert "exact_match,none" in data["results"]["sepllm_pg19_gen"]
    sepcache = data["sepllm_retention"]["sepcache"]
    assert sepcache["generate_calls"] == 1 and 0 < sepcache["time_averaged_kept_over_seen"] < 1
    # generation ran through SepCache, so the mask path saw no forward of it
    assert data["sepllm_retention"]["mask_path"]["forward_calls"] == 0
    assert "SepCache time-averaged KV retention" in capsys.readouterr().out


def test_cli_bad_input_is_one_clear_line(tiny_llama_dir, reference_configs_dir, in_repo, capsys):
    cli = _load_cli()
    base = ["--model-path", str(tiny_llama_dir), "--tasks", "sepllm_pg19_mc", "--include-path", str(INCLUDE),
            "--device", "cpu", "--limit", "2"]
    rc = cli.main(base + ["--sepllm-config", str(reference_configs_dir / "llama3_sepllm_a3_n256.yml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("lm_eval_sepllm: error:") and "'Layer_num' = 32" in err[-1]
    assert not any("Traceback" in line for line in err)
    rc = cli.main(base + ["--sepllm-config", str(reference_configs_dir / "llama3_sepllm_a3_n256.yml"),
                          "--sepllm-override", "Layer_num=2", "--sepllm-override", "prefil_local_window_size=4"])
    assert rc == 2 and "unknown key 'prefil_local_window_size'" in capsys.readouterr().err
    rc = cli.main(base[:2] + ["--tasks", "no_such_task", "--include-path", str(INCLUDE), "--sepcache"])
    assert rc == 2 and "unknown task(s) ['no_such_task']" in capsys.readouterr().err
