"""Data formats TRL users have (issue 10, part 4): implicit-prompt preference text, the
``margin`` column in the reward loss, SFT ``text`` rows, message content as a list of parts.
(HH rows that differ before the final reply are skipped with that reason: tests/test_data_formats.py.)"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import write_jsonl
from hf_fixtures import gpt2_style_tokenizer, llama3_chat_tokenizer
from micro import MICRO_ARCH

from lit_p3o.data.encoding import Encoded
from lit_p3o.data.formats import (
    DataFormatError,
    PreferenceRecord,
    SFTRecord,
    detect_preference_format,
    parse_preferences,
    parse_sft,
    shared_prefix_length,
)
from lit_p3o.data.preferences import Pair, PreferenceDataModule, collate_pairs
from lit_p3o.data.sft import SFTDataModule
from lit_p3o.losses import bradley_terry_loss
from lit_p3o.models import ModelSpec
from lit_p3o.stages.reward import RewardModule

IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},  # TRL's own example
    {"chosen": "Capital of France? Paris.", "rejected": "Capital of France? Rome."},
    {"chosen": "Yes", "rejected": "No"},  # nothing shared: an empty prompt
    {"chosen": "Hello there", "rejected": "Hello there, friend"},  # one contains the other
]


# --------------------------------------------------------------------------- implicit prompts


def test_shared_prefix_is_cut_as_trl_extract_prompt_does():
    assert shared_prefix_length("The sky is blue.", "The sky is green.") == len("The sky is")
    assert shared_prefix_length("Capital? Paris.", "Capital? Rome.") == len("Capital?")
    assert shared_prefix_length("abc", "abd") == 2  # no space to give back
    assert shared_prefix_length("Yes", "No") == 0
    assert shared_prefix_length("Hello there", "Hello there, friend") == len("Hello there")


def test_implicit_prompt_text_rows_are_read_not_skipped_as_hh(caplog):
    assert detect_preference_format(IMPLICIT[0]) == "trl_implicit"
    assert detect_preference_format({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "x"}) == "hh"
    with caplog.at_level(logging.WARNING, logger="lit_p3o.data"):
        records = parse_preferences(IMPLICIT, "implicit.jsonl", strict=False)
    assert list(records) == [
        PreferenceRecord("The sky is", " blue.", " green."),
        PreferenceRecord("Capital of France?", " Paris.", " Rome."),
        PreferenceRecord("", "Yes", "No"),
    ]
    assert "skipped 1 of 4 rows of implicit.jsonl: 1 × chosen: empty response (rows 3)" in caplog.text
    with pytest.raises(DataFormatError, match="implicit.jsonl: row 3: field `chosen`: empty response"):
        parse_preferences(IMPLICIT, "implicit.jsonl")


def test_preference_datamodule_on_implicit_rows(tmp_path):
    tokenizer = gpt2_style_tokenizer(pad="eos")
    path = write_jsonl(tmp_path / "implicit.jsonl", IMPLICIT[:2])
    dm = PreferenceDataModule(train=str(path), tokenizer=tokenizer, val_fraction=0.0, strict=True, max_length=64)
    dm.setup("fit")
    assert len(dm.train_pairs) == 2
    chosen, rejected = next(
        p for p in dm.train_pairs if len(p[0].prompt_ids) == len(tokenizer("The sky is")["input_ids"])
    )
    assert chosen.prompt_ids == rejected.prompt_ids == tokenizer("The sky is")["input_ids"]
    assert tokenizer.decode(chosen.response_ids) == " blue.<|endoftext|>"


# --------------------------------------------------------------------------- margin


def test_margin_column_is_read_and_checked(caplog):
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2},
        {"prompt": "Q", "chosen": "fine", "rejected": "bad", "margin": 0.5},
        {"prompt": "Q", "chosen": "ok", "rejected": "bad"},  # none: plain Bradley-Terry
        {"prompt": "Q", "chosen": "meh", "rejected": "bad", "margin": None},
        {"prompt": "Q", "chosen": "eh", "rejected": "bad", "margin": "high"},
        {"prompt": "Q", "chosen": "ah", "rejected": "bad", "margin": float("nan")},
    ]
    with caplog.at_level(logging.WARNING, logger="lit_p3o.data"):
        records = parse_preferences(rows, "m.jsonl", strict=False)
    assert [r.margin for r in records] == [2.0, 0.5, 0.0, 0.0]
    assert "skipped 2 of 6 rows of m.jsonl: 2 × margin: not a finite number (rows 4, 5)" in caplog.text
    with pytest.raises(DataFormatError, match="m.jsonl: row 4: field `margin`: not a finite number"):
        parse_preferences(rows, "m.jsonl")
    conversational = [
        {
            "prompt": [{"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
            "margin": 1.5,
        }
    ]
    assert parse_preferences(conversational, "c", tokenizer=llama3_chat_tokenizer())[0].margin == 1.5


def test_bradley_terry_loss_subtracts_the_margin():
    chosen, rejected, margin = torch.tensor([1.0, 0.0]), torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])
    by_hand = (math.log1p(math.exp(-(0.5 - 2.0))) + math.log1p(math.exp(-(1.0 - 0.25)))) / 2
    assert bradley_terry_loss(chosen, rejected, margin=margin).item() == pytest.approx(by_hand, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, margin=torch.zeros(2)).item() == pytest.approx(
        bradley_terry_loss(chosen, rejected).item()
    )


def test_margin_reaches_the_reward_model_loss_as_in_trl(tmp_path, monkeypatch):
    """TRL's RewardTrainer: ``loss = −logsigmoid(r_w − r_l − margin).mean()``."""
    tokenizer_spec = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")
    torch.manual_seed(0)
    module = RewardModule(tokenizer_spec)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    rows = [
        {"prompt": "rate the tea :", "chosen": "it is good .", "rejected": "it is bad .", "margin": 3.0},
        {"prompt": "rate the mug :", "chosen": "i like it .", "rejected": "i hate it .", "margin": -1.0},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    dm = PreferenceDataModule(
        train=str(path), tokenizer=module.tokenizer, val_fraction=0.0, batch_size=2, max_length=32
    )
    dm.setup("fit")
    pairs = sorted(dm.train_pairs, key=lambda p: -p.margin)  # the module shuffles rows
    assert [module.tokenizer.decode(p[0].response_ids, skip_special_tokens=True) for p in pairs] == [
        "it is good .",
        "i like it .",
    ]
    batch = collate_pairs(pairs, module.tokenizer.pad_token_id)
    assert batch.margin.tolist() == [3.0, -1.0]
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        hf = module.reward_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    chosen, rejected = hf.chunk(2)
    expected = -F.logsigmoid(chosen - rejected - torch.tensor([3.0, -1.0])).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    without = -F.logsigmoid(chosen - rejected).mean()
    assert abs(loss.item() - without.item()) > 1e-2  # the margin changed the loss


def test_pairs_keep_their_margin_through_pickling_and_plain_tuples_have_none():
    import pickle

    pair = Pair(Encoded([1], [2]), Encoded([1], [3]), 0.75)
    again = pickle.loads(pickle.dumps(pair))
    assert again == pair and again.margin == 0.75
    chosen, rejected = again
    assert chosen.response_ids == [2]
    assert collate_pairs([(chosen, rejected)], 0).margin.tolist() == [0.0]


# --------------------------------------------------------------------------- SFT text rows


def test_sft_text_rows_are_plain_language_modelling(tmp_path):
    rows = [{"text": "The quick brown fox."}, {"text": "Hello world."}, {"text": ""}]
    assert list(parse_sft(rows, "t.jsonl", strict=False)) == [
        SFTRecord("", rows[0]["text"]),
        SFTRecord("", rows[1]["text"]),
    ]
    with pytest.raises(DataFormatError, match="t.jsonl: row 2: field `text`: empty"):
        parse_sft(rows, "t.jsonl")
    tokenizer = llama3_chat_tokenizer()
    dm = SFTDataModule(train=str(write_jsonl(tmp_path / "t.jsonl", rows[:2])), tokenizer=tokenizer, val_fraction=0.0)
    dm.setup("fit")
    expected = {
        tuple(tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for r in rows[:2]
    }
    assert {tuple(e.response_ids) for e in dm.train_examples} == expected  # every token of the text trained
    assert all(e.prompt_ids == [tokenizer.bos_token_id] for e in dm.train_examples)  # only BOS is not


# --------------------------------------------------------------------------- content as parts


def test_message_content_as_a_list_of_parts():
    tokenizer = llama3_chat_tokenizer()
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "12 + 7?"}]
    as_parts = {
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": "19"}]},
        ]
    }
    as_text = {"messages": [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "19"}]}
    assert list(parse_sft([as_parts], "p", tokenizer)) == list(parse_sft([as_text], "p", tokenizer))
    image = {
        "messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}, *parts]}, as_text["messages"][1]]
    }
    with pytest.raises(DataFormatError) as info:
        parse_sft([image], "p", tokenizer)
    assert (
        str(info.value)
        == "p: row 0: field `messages`: message content holds a part of type 'image'; only text parts are supported"
    )
    with pytest.raises(DataFormatError, match="a part without a `type`"):
        parse_sft([{"messages": [{"role": "user", "content": ["hi"]}, as_text["messages"][1]]}], "p", tokenizer)
