"""Truncation policy and batch layout on hand-written ids."""

from __future__ import annotations

import pytest
import torch

from lit_p3o.data.encoding import (
    IGNORE_INDEX,
    Encoded,
    ResponseTooLong,
    TruncationStats,
    collate,
    encode_example,
    encode_prompt,
    encode_response,
    fit_prompt,
    position_ids_from_mask,
)

BOS, PAD = 3, 0


def test_fit_prompt_keeps_the_end_and_a_leading_bos():
    stats = TruncationStats()
    assert fit_prompt([BOS, 10, 11, 12, 13, 14], 4, BOS, stats) == [BOS, 12, 13, 14]
    assert (stats.examples, stats.truncated_prompts, stats.removed_tokens) == (1, 1, 2)
    # without a BOS the last tokens are kept
    assert fit_prompt([10, 11, 12, 13, 14], 3, BOS, stats) == [12, 13, 14]
    # a budget of one token keeps the last token, not the BOS
    assert fit_prompt([BOS, 10, 11], 1, BOS, stats) == [11]
    # a prompt that fits is untouched and counted as an example only
    assert fit_prompt([BOS, 10], 2, BOS, stats) == [BOS, 10]
    # a tokenizer without BOS never keeps a first token specially
    assert fit_prompt([BOS, 10, 11, 12], 2, None, stats) == [11, 12]
    assert (stats.examples, stats.truncated_prompts, stats.removed_tokens) == (5, 4, 2 + 2 + 2 + 2)
    assert stats.describe() == "4 of 5 prompts truncated from the left (8 tokens removed)"


def test_fit_prompt_rejects_an_empty_budget():
    with pytest.raises(ValueError, match="at least 1"):
        fit_prompt([1, 2], 0, None)


def test_encode_example_with_the_embedded_tokenizer(micro_tokenizer):
    tok = micro_tokenizer
    vocab = tok.get_vocab()
    prompt = "write a review of the pizza :"
    response = "the pizza is great ."
    p_ids = [vocab[w] for w in prompt.split()]
    r_ids = [vocab[w] for w in response.split()] + [tok.eos_token_id]
    assert encode_prompt(tok, prompt) == p_ids  # the embedded tokenizer adds no BOS
    assert encode_response(tok, response) == r_ids
    assert encode_response(tok, response, add_eos=False) == r_ids[:-1]

    stats = TruncationStats()
    enc = encode_example(tok, prompt, response, max_length=len(p_ids) + len(r_ids), stats=stats)
    assert (enc.prompt_ids, enc.response_ids) == (p_ids, r_ids)
    enc = encode_example(tok, prompt, response, max_length=len(r_ids) + 3, stats=stats)
    assert enc.prompt_ids == p_ids[-3:]  # "the pizza :"
    assert enc.response_ids == r_ids  # a response is never cut
    assert (stats.examples, stats.truncated_prompts, stats.removed_tokens) == (2, 1, len(p_ids) - 3)


def test_encode_example_keeps_bos_of_a_bos_adding_tokenizer(micro_tokenizer):
    tok = micro_tokenizer
    vocab = tok.get_vocab()

    class WithBos:  # a Llama-like tokenizer: BOS prefixed when special tokens are added
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ([BOS] if add_special_tokens else []) + ids}

    enc = encode_example(WithBos(), "write a review of the pizza :", "it is okay .", max_length=8)
    assert enc.response_ids == [vocab["it"], vocab["is"], vocab["okay"], vocab["."], tok.eos_token_id]
    assert enc.prompt_ids == [BOS, vocab["pizza"], vocab[":"]]


def test_response_too_long(micro_tokenizer):
    # 4 words + EOS = 5 tokens: max_length 5 leaves no room for even one prompt token
    with pytest.raises(ResponseTooLong, match="5 tokens"):
        encode_example(micro_tokenizer, "review the pizza :", "the pizza is great", max_length=5)
    enc = encode_example(micro_tokenizer, "review the pizza :", "the pizza is great", max_length=6)
    assert len(enc.prompt_ids) == 1 and len(enc.response_ids) == 5


def test_collate_layout():
    batch = collate(
        [
            Encoded([BOS, 10, 11], [20, 21, 1]),
            Encoded([12], [22, 1]),
            Encoded([BOS, 13], [1]),
        ],
        pad_token_id=PAD,
    )
    P = PAD
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [
        [BOS, 10, 11, 20, 21, 1],
        [P, P, 12, 22, 1, P],
        [P, BOS, 13, 1, P, P],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 0],
        [0, 1, 1, 1, 0, 0],
    ]
    assert batch.response_mask.tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0, 0],
    ]
    # positions count real tokens only, so left padding does not shift them
    assert batch.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5],
        [0, 0, 0, 1, 2, 2],
        [0, 0, 1, 2, 2, 2],
    ]
    I = IGNORE_INDEX  # noqa: E741 (reads as "ignored" in the table below)
    assert batch.labels().tolist() == [
        [I, I, I, 20, 21, 1],
        [I, I, I, 22, 1, I],
        [I, I, I, 1, I, I],
    ]
    assert all(t.dtype == torch.long for t in (batch.input_ids, batch.attention_mask, batch.position_ids))
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.prompt_width == 3


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_collate_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=PAD)


def test_an_empty_prompt_becomes_one_start_token(micro_tokenizer):
    """Otherwise the first response token would be predicted from a padding column."""
    tok = micro_tokenizer
    assert encode_prompt(tok, "") == [tok.bos_token_id]
    enc = encode_example(tok, "", "it is good .", max_length=16)
    assert enc.prompt_ids == [BOS] and len(enc.response_ids) == 5
    batch = collate([enc, encode_example(tok, "rate the mug :", "it is good .", 16)], PAD)
    assert batch.input_ids[0, batch.prompt_width - 1] == BOS and batch.attention_mask[0, batch.prompt_width - 1] == 1

    class NoBos:
        bos_token_id, eos_token_id = None, 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": []}

    assert encode_prompt(NoBos(), "") == [1]
