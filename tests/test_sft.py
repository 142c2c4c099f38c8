"""Supervised fine-tuning: label datasets from prompt / completion and chat JSONL, the packing modes, the masked
loss, and fine-tuning runs (from our checkpoint and from an imported HF model) that resume exactly.

Tiny everything: the character-level tokenizer where exact label rows are written out by hand, the GPT-NeoX-20B
tokenizer with a 2-layer hidden-64 model for the runs.
"""

from __future__ import annotations

import copy
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.data.chat_templates import prompt_text, named_template, turn_segments
from megatron.data.cli_utils import run_cli
from megatron.data.errors import DataError
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.data.packing import IGNORE_LABEL, fit_document
from megatron.data.sft import prepare_sft
from megatron.errors import UserInputError
from megatron.model.loss import lm_loss
from megatron.tokenizer import CharLevelTokenizer, build_tokenizer
from megatron.training.batches import BatchRules, make_batch
from train_helpers import REPO, tiny_config

import prepare_data  # noqa: E402  (the repository root is on sys.path under pytest)

M = IGNORE_LABEL


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _rows(prefix: str) -> list[list[int]]:
    ds = MMapIndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


# ---------------------------------------------------------------------------------------------------------------
# preparing data


def test_prompt_completion_and_chat_records_give_the_expected_label_rows(tmp_path):
    src = _write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Q: 2+3=", "completion": " 5"},
        "",                                                                    # blank lines are skipped
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Ciao"}]},
    ])
    results = prepare_sft(str(src), str(tmp_path / "out"), tokenizer=CharLevelTokenizer(512), chat_template="plain",
                          progress=False)
    assert [(r.key, r.documents) for r in results] == [("text", 2), ("label", 2)]
    text, label = _rows(str(tmp_path / "out_text_document")), _rows(str(tmp_path / "out_label_document"))
    assert MMapIndexedDataset(str(tmp_path / "out_label_document")).dtype == np.int32    # signed: -100 fits
    assert MMapIndexedDataset(str(tmp_path / "out_text_document")).dtype == np.uint16
    # an explicit template renders a prompt / completion pair as one user and one assistant turn
    prompt = "### User:\nQ: 2+3=\n\n### Assistant:\n"
    assert text[0] == _chars(prompt + " 5\n\n") + [0]
    assert label[0] == [M] * len(prompt) + _chars(" 5\n\n") + [0]
    # chat: system / user turns and the reply's opening marker carry no loss; both assistant turns and the EOD do
    head = "Be brief.\n\n### User:\nHi\n\n### Assistant:\n"
    middle = "### User:\nBye\n\n### Assistant:\n"
    assert text[1] == _chars(head + "Hey\n\n" + middle + "Ciao\n\n") + [0]
    assert label[1] == [M] * len(head) + _chars("Hey\n\n") + [M] * len(middle) + _chars("Ciao\n\n") + [0]

    # without a template a pair is prompt tokens + completion tokens + EOD; --only-last trains on the last turn only
    prepare_sft(str(src), str(tmp_path / "last"), tokenizer=CharLevelTokenizer(512), chat_template="chatml",
                only_last=True, progress=False)
    chat = _rows(str(tmp_path / "last_label_document"))[1]
    trained = "".join(chr(t) for t in chat if t > 0)
    assert trained == "Ciao<|im_end|>\n" and chat[-1] == 0
    _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "ab", "completion": "cd"}])
    prepare_sft(str(tmp_path / "pairs.jsonl"), str(tmp_path / "raw"), tokenizer=CharLevelTokenizer(512),
                progress=False)
    assert _rows(str(tmp_path / "raw_text_document")) == [_chars("abcd") + [0]]
    assert _rows(str(tmp_path / "raw_label_document")) == [[M, M] + _chars("cd") + [0]]


def test_cli_writes_the_pair_with_the_bundled_tokenizer_and_chatml(tmp_path, capsys):
    """prepare_data.py --sft with the GPT-NeoX-20B tokenizer: the trained tokens decode to exactly the assistant
    content + the template's end marker; preprocess_data.py writes the same files."""
    src = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Capital of Peru?"},
                                                               {"role": "assistant", "content": "Lima"}]}])
    out = tmp_path / "ds"
    assert run_cli(prepare_data.main, "prepare_data.py", ["x", "--sft", "--input", str(src), "--chat-template",
                                                          "chatml", "--output-prefix", str(out), "--no-progress"]) == 0
    assert "ds_label_document.bin/.idx: 1 documents" in capsys.readouterr().out
    tok = build_tokenizer("HFTokenizer", str(REPO / "megatron/tokenizer/assets/20B_tokenizer.json"))
    text, label = _rows(f"{out}_text_document")[0], _rows(f"{out}_label_document")[0]
    assert tok.detokenize(text) == ("<|im_start|>user\nCapital of Peru?<|im_end|>\n<|im_start|>assistant\nLima"
                                    "<|im_end|>\n<|endoftext|>")
    assert tok.detokenize([t for t in label if t >= 0]) == "Lima<|im_end|>\n<|endoftext|>"
    assert all(lab in (t, M) for t, lab in zip(text, label))

    preprocess_main = runpy.run_path(str(REPO / "tools/datasets/preprocess_data.py"), run_name="preprocess")["main"]
    assert run_cli(preprocess_main, "preprocess_data.py", [
        "--sft", "--input", str(src), "--chat-template", "chatml", "--output-prefix", str(tmp_path / "pp"),
        "--tokenizer-type", "HFTokenizer", "--vocab-file", str(REPO / "megatron/tokenizer/assets/20B_tokenizer.json"),
        "--no-progress"]) == 0
    for key in ("text", "label"):
        assert Path(f"{tmp_path}/pp_{key}_document.bin").read_bytes() == Path(f"{out}_{key}_document.bin").read_bytes()


def test_the_tokenizers_own_chat_template_is_the_default(tmp_path):
    vocab = tmp_path / "tokenizer.json"
    vocab.write_bytes((REPO / "megatron/tokenizer/assets/20B_tokenizer.json").read_bytes())
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant] {% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    src = _write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    prepare_sft(str(src), str(tmp_path / "o"), tokenizer_type="HFTokenizer", vocab_file=str(vocab), progress=False)
    tok = build_tokenizer("HFTokenizer", str(vocab))
    text, label = _rows(str(tmp_path / "o_text_document"))[0], _rows(str(tmp_path / "o_label_document"))[0]
    assert tok.detokenize(text) == "[user] hi\n[assistant] yo\n<|endoftext|>"
    assert tok.detokenize([t for t in label if t >= 0]) == "yo\n<|endoftext|>"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": ', "invalid JSON"),
    ('{"prompt": "a"}', "record has no key 'completion'"),
    ('{"prompt": "a", "completion": ""}', "empty completion"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "needs a chat template"),
    ('{"messages": [{"role": "robot", "content": "a"}]}', "role 'robot'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_records_fail_in_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    src = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "fine"}, line])
    code = run_cli(prepare_data.main, "prepare_data.py",
                   ["x", "--sft", "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--no-progress",
                    "-t", "CharLevelTokenizer"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"{src}:2: " in err and message in err, err
    assert not list(tmp_path.glob("o_*"))                                              # nothing half-written


def test_flags_need_sft_and_a_named_template_must_exist(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}])
    for argv, message in ((["--chat-template", "plain"], "--chat-template only applies to fine-tuning data"),
                          (["--sft", "--chat-template", "nope"], "--chat-template 'nope': expected one of"),
                          (["--sft", "--chat-template", "tokenizer"], "has no chat_template"),
                          (["--sft", "--generation-role", "bot"], "--generation-role 'bot': expected one of")):
        code = run_cli(prepare_data.main, "prepare_data.py", ["x", "--input", str(src), "--output-prefix",
                                                              str(tmp_path / "o"), "--no-progress", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err, err


def test_chat_segments_concatenate_and_prompt_text_opens_the_reply():
    template = named_template("chatml")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    parts = turn_segments(template, messages)
    assert "".join(t for _, t in parts) == template.render(messages, False)
    assert parts[0] == ("user", "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_text(named_template("plain"), "2+2?") == "### User:\n2+2?\n\n### Assistant:\n"


# ---------------------------------------------------------------------------------------------------------------
# samples: pack_impl


def _pair(tmp_path: Path, docs: list[list[int]], labels: list[list[int]]) -> tuple[MMapIndexedDataset, ...]:
    for name, rows, dtype in (("t", docs, np.uint16), ("l", labels, np.int32)):
        with MMapIndexedDatasetBuilder(tmp_path / name, dtype) as b:
            for row in rows:
                b.add_document(row)
            b.finalize()
    return MMapIndexedDataset(tmp_path / "t"), MMapIndexedDataset(tmp_path / "l")


# four documents (EOD 0 last); document 2 is longer than a 6-token sample, document 3 has nothing to learn
DOCS = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 11, 0], [12, 0]]
LABELS = [[M, M, 3, 0], [M, 5, 0], [M, M, 8, 9, 10, 11, 0], [M, M]]


def _samples(ds: GPTDataset) -> list[tuple[list[int], list[int]]]:
    return [(ds[i]["text"].tolist(), ds[i]["label"].tolist()) for i in range(len(ds))]


def test_fit_document_cuts_and_pads():
    text, label = fit_document(np.array([5, 6, 0]), np.array([M, 6, 0]), 5)
    assert text.tolist() == [5, 6, 0, 0, 0] and label.tolist() == [M, 6, 0, M, M]
    text, label = fit_document(np.array([5, 6, 7, 0]), None, 3)
    assert text.tolist() == [5, 6, 7] and label.tolist() == [5, 6, 7]
    with pytest.raises(DataError, match="must match"):
        fit_document(np.array([1, 2]), np.array([1]), 4)


@pytest.mark.parametrize("pack_impl", ["pack_until_overflow", "unpacked"])
@pytest.mark.parametrize("allow_chopped", [True, False])
def test_whole_document_samples(tmp_path, pack_impl, allow_chopped):
    text, label = _pair(tmp_path, DOCS, LABELS)
    ds = GPTDataset("train", text, np.arange(4), 3, 5, 1, tmp_path / "cache", label_indexed=label,
                    pack_impl=pack_impl, allow_chopped=allow_chopped)
    samples = _samples(ds)
    assert ds.dropped_documents == {"too_long": 0 if allow_chopped else 1, "no_target": 1}
    expected = {(tuple(DOCS[0] + [0, 0]), tuple(LABELS[0] + [M, M])), (tuple(DOCS[1] + [0, 0, 0]),
                                                                      tuple(LABELS[1] + [M, M, M]))}
    if allow_chopped:                          # the long document is cut to the sample's 6 positions
        expected.add((tuple(DOCS[2][:6]), tuple(LABELS[2][:6])))
    # documents 0 + 1 (7 tokens) overflow 6 positions, so each mode gives one document per sample here
    assert {(tuple(t), tuple(lab)) for t, lab in samples} == expected
    assert len(samples) >= 3 and all(len(t) == len(lab) == 6 for t, lab in samples)
    again = GPTDataset("train", text, np.arange(4), 3, 5, 1, tmp_path / "cache2", label_indexed=label,
                       pack_impl=pack_impl, allow_chopped=allow_chopped)
    assert _samples(again) == samples                               # same seed -> same order, from a fresh index


def test_pack_until_overflow_packs_whole_documents_and_packed_stitches_labels(tmp_path):
    docs = [[1, 0], [2, 3, 0], [4, 5, 6, 0], [7, 0]]
    labels = [[M, 0], [M, 3, 0], [M, M, 6, 0], [7, 0]]
    text, label = _pair(tmp_path, docs, labels)
    ds = GPTDataset("train", text, np.arange(4), 2, 7, 3, tmp_path / "c", label_indexed=label,
                    pack_impl="pack_until_overflow")
    for t, lab in _samples(ds):
        assert len(t) == 8
        n = len(t) - next(i for i, v in enumerate(reversed(lab)) if v != M)   # up to the last counted label
        body = [d for d in docs if tuple(d) in {tuple(t[i:i + len(d)]) for i in range(n)}]
        assert sum(len(d) for d in body) <= 8
        assert lab[sum(len(d) for d in body):] == [M] * (8 - sum(len(d) for d in body))  # padding never counts
    order = np.asarray(ds.doc_idx)[: ds.sample_idx[-1, 0]]
    assert sorted(order.tolist()) == [0, 1, 2, 3]                                # one epoch: every document once
    packed = GPTDataset("train", text, np.arange(4), 2, 4, 3, tmp_path / "p", label_indexed=label)
    stream_t = [v for i in np.asarray(packed.doc_idx) for v in docs[i]]
    stream_l = [v for i in np.asarray(packed.doc_idx) for v in labels[i]]
    for i in range(len(packed)):
        j = int(packed.shuffle_idx[i])
        assert packed[i]["text"].tolist() == stream_t[4 * j: 4 * j + 5]
        assert packed[i]["label"].tolist() == stream_l[4 * j: 4 * j + 5]


def test_a_split_shorter_than_one_sample_is_fine_when_documents_are_padded(tmp_path):
    """Pre-flight refuses a packed split of fewer than seq_length + 1 tokens; whole-document samples pad instead
    (a small held-out set with a long seq_length)."""
    from megatron.training.data_setup import SplitDatasets
    from megatron.training.preflight import check_sequence_fits_data

    text, label = _pair(tmp_path, DOCS[:2], LABELS[:2])
    for pack_impl in ("pack_until_overflow", "unpacked"):
        ds = GPTDataset("valid", text, np.arange(2), 4, 64, 1, tmp_path / pack_impl, label_indexed=label,
                        pack_impl=pack_impl)
        check_sequence_fits_data(SplitDatasets(train=None, valid=ds, test=None), 64)
        assert ds[0]["text"].shape == (65,)


def test_mismatched_label_data_fails_in_one_line_naming_both(tmp_path):
    text, _ = _pair(tmp_path, DOCS, LABELS)
    (tmp_path / "x").mkdir()
    _, short = _pair(tmp_path / "x", DOCS, [row[:-1] or [M] for row in LABELS])
    with pytest.raises(DataError) as info:
        GPTDataset("train", text, np.arange(4), 3, 5, 1, tmp_path / "c", label_indexed=short)
    msg = str(info.value)
    assert "\n" not in msg and str(short.prefix) in msg and str(text.prefix) in msg and "sequence 0" in msg


# ---------------------------------------------------------------------------------------------------------------
# the loss


def _tiny_model(vocab: int = 96) -> torch.nn.Module:
    from megatron.config.model import ModelConfig
    from megatron.model.gpt import GPTModel

    torch.manual_seed(0)
    return GPTModel(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                                padded_vocab_size=vocab, pos_emb="rotary"))


def test_loss_is_the_masked_cross_entropy_and_prompt_targets_never_contribute():
    g = torch.Generator().manual_seed(4)
    text = torch.randint(1, 96, (2, 17), generator=g)
    label = text.clone()
    label[0, :9] = M                                            # row 0: a 9-token prompt
    label[1, :3] = M
    label[1, 12:] = M                                           # row 1: padding after its completion
    batch = make_batch({"text": text, "label": label}, BatchRules(), "cpu")
    counted = batch.loss_mask.bool()
    assert torch.equal(counted, label[:, 1:] >= 0)
    model = _tiny_model()
    inputs = []

    def keep(module, args, out):
        out.retain_grad()
        inputs.append(out)

    model.embed.register_forward_hook(keep)
    logits = model(batch.tokens)
    logits.retain_grad()
    loss = lm_loss(logits, batch.labels, batch.loss_mask)
    # by hand: log-softmax at the counted positions only, mean over them
    picked = logits.detach()[counted]
    log_probs = picked - torch.logsumexp(picked, dim=-1, keepdim=True)
    by_hand = -log_probs.gather(1, batch.labels[counted][:, None]).mean()
    torch.testing.assert_close(loss.detach(), by_hand, atol=1e-6, rtol=1e-6)
    loss.backward()
    # no gradient at all from a prompt / padding target: the logits' gradient there is exactly zero ...
    assert torch.all(logits.grad[~counted] == 0) and torch.all(logits.grad[counted].abs().sum(-1) > 0)
    # ... and the input embeddings after row 1's last counted target (only followed by uncounted ones) get none
    (embedded,) = inputs
    assert torch.all(embedded.grad[1, 11:] == 0) and torch.all(embedded.grad[1, :11].abs().sum(-1) > 0)
    # other labels at the prompt / padding targets (any negative value, or ids under a zero mask) leave the loss
    changed = torch.randint(1, 96, label.shape, generator=g)
    other = make_batch({"text": text, "label": torch.where(label < 0, -changed, label)}, BatchRules(), "cpu")
    assert torch.equal(lm_loss(logits, other.labels, other.loss_mask), loss)
    assert torch.equal(lm_loss(logits, torch.where(counted, batch.labels, changed[:, 1:]), batch.loss_mask), loss)


# ---------------------------------------------------------------------------------------------------------------
# runs


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, neox_tokenizer_file) -> str:
    """60 demo instruction pairs (tools/datasets/make_demo_instructions.py), prepared with the plain template."""
    out = tmp_path_factory.mktemp("sft")
    make = runpy.run_path(str(REPO / "tools/datasets/make_demo_instructions.py"), run_name="make")
    assert make["main"](["--out-dir", str(out), "--train", "60", "--heldout", "4"]) == 0
    prepare_sft(str(out / "train.jsonl"), str(out / "train"), tokenizer_type="HFTokenizer",
                vocab_file=str(neox_tokenizer_file), chat_template="plain", progress=False)
    return str(out / "train")


def _sft_config(sft_data: str, tokenizer: Path, run_dir: Path, **overrides):
    """The tiny model fine-tuned on ``sft_data``: whole conversations packed into 64-token samples, kept apart by
    document masks (positions restarting per conversation, no attention across conversations)."""
    keys = {"training__reset_attention_mask": True, **overrides}
    return tiny_config(f"{sft_data}_text_document", tokenizer, run_dir, seq=64, data__data_path=None,
                       data__train_data_paths=[f"{sft_data}_text_document"],
                       data__train_label_data_paths=[f"{sft_data}_label_document"],
                       data__pack_impl="pack_until_overflow", training__reset_position_ids=True,
                       checkpoint__save=str(run_dir / "ckpt"), **keys)


def _first_batch(cfg):
    """The run's first global batch, built the way the loop builds it (same datasets, same order, same rules)."""
    from megatron.training.data_setup import build_datasets

    t = cfg.training
    datasets = build_datasets(cfg, t.train_batch_size, t.train_iters)
    rows = [datasets.train[i] for i in range(t.train_batch_size)]
    sample = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}
    eod = build_tokenizer(cfg.tokenizer.tokenizer_type, cfg.tokenizer.vocab_file).eod
    return make_batch(sample, BatchRules.of(cfg, eod), "cpu")


def test_finetune_from_our_checkpoint_counts_only_labels_and_resumes_exactly(corpus, neox_tokenizer_file, sft_data,
                                                                               tmp_path):
    from megatron.checkpoint.trained import load_trained_model
    from megatron.training import pretrain

    pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "pre", train_iters=1, seq=64,
                         checkpoint__save=str(tmp_path / "pre" / "ckpt")))
    cfg = _sft_config(sft_data, neox_tokenizer_file, tmp_path / "sft", train_iters=4, checkpoint__finetune=True,
                      checkpoint__load=str(tmp_path / "pre" / "ckpt"), checkpoint__checkpoint_factor=2)
    full = pretrain(cfg)
    assert sorted(full.train_losses) == [1, 2, 3, 4]
    # iteration 1 is the pre-trained weights' masked loss on the first packed batch: labels, packing, restarted
    # positions and the loaded weights all as computed here by hand
    batch = _first_batch(cfg)
    assert batch.position_ids is not None and int(batch.position_ids.max()) < 64
    assert int(batch.document_ids.max()) >= 1                                   # several conversations per sample
    assert 0 < int(batch.loss_mask.sum()) < batch.loss_mask.numel() / 2        # most positions are prompt or padding
    model = load_trained_model(tmp_path / "pre" / "ckpt").model
    with torch.no_grad():
        expected = lm_loss(model(batch.tokens, position_ids=batch.position_ids, document_ids=batch.document_ids),
                           batch.labels, batch.loss_mask)
    assert full.train_losses[1] == pytest.approx(float(expected), rel=1e-5)

    # tools/eval_label_loss.py: every document once, whole; the mean over its counted targets, computed here apart
    tool = runpy.run_path(str(REPO / "tools/eval_label_loss.py"), run_name="eval_label_loss")
    text_ds, label_ds = (MMapIndexedDataset(f"{sft_data}_{k}_document") for k in ("text", "label"))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(text_ds)):
            ids, targets = torch.as_tensor(text_ds[i].astype(np.int64)), torch.as_tensor(label_ds[i].astype(np.int64))
            keep = targets[1:] >= 0
            logits = model(ids[None, :-1])[0]
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[1:][keep], reduction="sum"))
            count += int(keep.sum())
    loss, counted = tool["label_loss"](model, text_ds, label_ds, 64, batch_size=7)
    assert counted == count and loss == pytest.approx(total / count, rel=1e-5)

    resumed = pretrain(_sft_config(sft_data, neox_tokenizer_file, tmp_path / "resumed", train_iters=4,
                                   checkpoint__load=str(tmp_path / "sft" / "ckpt" / "global_step2")))
    assert sorted(resumed.train_losses) == [3, 4]
    for it in (3, 4):
        assert resumed.train_losses[it] == full.train_losses[it]

    # generate.py with chat_template: a prompt is the user turn + the reply's opening, tokenized as in training
    from megatron.inference.cli import load_session

    gen_cfg = copy.deepcopy(cfg)
    gen_cfg.checkpoint.load, gen_cfg.generation.chat_template = str(tmp_path / "sft" / "ckpt"), "plain"
    gen_cfg.generation.maximum_tokens = 3
    session = load_session([], [], config=gen_cfg)
    record = json.loads(Path(sft_data).with_name("train.jsonl").read_text().splitlines()[0])
    text, label = (MMapIndexedDataset(f"{sft_data}_{k}_document")[0].tolist() for k in ("text", "label"))
    reply_starts = next(i for i, v in enumerate(label) if v >= 0)
    assert session._prompt_ids([record["messages"][0]["content"]]) == [text[:reply_starts]]
    (sample,) = session.generate([record["messages"][0]["content"]])
    assert sample.length <= 3
    gen_cfg.generation.chat_template = "nope"
    with pytest.raises(UserInputError, match="^chat_template 'nope': expected one of chatml, plain"):
        load_session([], [], config=gen_cfg)


def test_finetune_from_an_imported_hf_model(neox_tokenizer_file, sft_data, tmp_path):
    """A tiny transformers GPT-NeoX -> convert_hf_to_neox's import -> fine-tuning: the first loss is the HF model's
    own masked loss on the first batch."""
    import transformers

    from megatron.checkpoint.hf.import_hf import import_from_hf
    from megatron.training import pretrain

    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
        hidden_act="gelu", eos_token_id=0, bos_token_id=0)).eval()
    hf.save_pretrained(tmp_path / "hf")
    import_from_hf(tmp_path / "hf", tmp_path / "imported")
    cfg = _sft_config(sft_data, neox_tokenizer_file, tmp_path / "sft", train_iters=1, checkpoint__finetune=True,
                      checkpoint__load=str(tmp_path / "imported"), training__reset_attention_mask=False)
    result = pretrain(cfg)
    batch = _first_batch(cfg)
    with torch.no_grad():
        logits = hf(input_ids=batch.tokens, position_ids=batch.position_ids).logits
    assert result.train_losses[1] == pytest.approx(float(lm_loss(logits, batch.labels, batch.loss_mask)), rel=1e-5)
    assert sorted(result.train_losses) == [1]
