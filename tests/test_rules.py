"""The SepLLM rule itself (megatron/sepllm/attention/rules.py) on the spec's worked examples."""

import torch

from megatron.sepllm.attention import rules

TOKENS = "A B C , D E . F G \\n".split()
VOCAB = {t: i for i, t in enumerate(dict.fromkeys(TOKENS))}
SEPS = [VOCAB[","], VOCAB["."], VOCAB["\\n"]]


def _ids(tokens):
    return torch.tensor([[VOCAB[t] for t in tokens]])


def test_worked_example_spec_1_3():
    ids = _ids(TOKENS)
    mask = rules.allowed_mask(rules.global_key_bitmap(ids, SEPS, num_initial=1), window=2)[0]
    assert int(mask.sum()) == 34
    last_row = {TOKENS[k] for k in torch.nonzero(mask[-1]).flatten().tolist()}
    assert last_row == {"A", ",", ".", "G", "\\n"}
    expected_row_f = [1, 0, 0, 1, 0, 0, 1, 1, 0, 0]
    assert mask[7].int().tolist() == expected_row_f
    # the decode rule over the full history is the last prefill row
    assert torch.equal(rules.decode_keep_mask(rules.global_key_bitmap(ids, SEPS, 1), 2)[0], mask[-1])


def test_no_separators_is_streamingllm():
    ids = torch.arange(600).unsqueeze(0) % 50 + 100
    g = rules.global_key_bitmap(ids, [-1], num_initial=3)
    assert int(rules.decode_keep_mask(g, 256).sum()) == 3 + 256


def test_fixllm_count_876():
    ids = torch.zeros(1, 876, dtype=torch.long)
    g = rules.global_key_bitmap(ids, [], num_initial=3, fixed_interval=5)
    assert int(rules.decode_keep_mask(g, 256).sum()) == 3 + 256 + 123


def test_bipe_examples_spec_1_8():
    s = 99
    ids = torch.tensor([[s, 5, 5, 5, s, s, 6], [5, 6, s, 7, 8, s, 9]])
    intra, inter = rules.bipe_position_ids(ids, [s])
    assert intra.tolist() == [[0, 0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 1, 2, 0]]
    assert inter.tolist() == [[0, 1, 1, 1, 1, 2, 3], [0, 0, 0, 1, 1, 1, 2]]


def test_left_padding_initial_positions_come_from_attention_mask():
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    pads = rules.left_pad_counts(attn)
    assert pads.tolist() == [2, 0, 4]
    init = rules.initial_bitmap(3, 5, 2, pads)
    assert init.int().tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]
    # padding keys are never attended when the validity mask is given
    g = rules.global_key_bitmap(torch.zeros(3, 5, dtype=torch.long), [0], 2, pads)
    allowed = rules.allowed_mask(g, 2, key_valid=attn)
    assert not bool((allowed & ~attn.bool().unsqueeze(1)).any())
