"""lit_p3o.data.preferences: the PreferenceDataModule's encoding, truncation, skips and checks."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import write_jsonl
from prefs_fixtures import CONV, CONV_RECORDS, TRL, TRL_RECORDS

from lit_p3o.data.encoding import Encoded
from lit_p3o.data.formats import DataFormatError
from lit_p3o.data.preferences import PreferenceDataModule, collate_pairs

DATA_LOG = "lit_p3o.data"


# --------------------------------------------------------------------------- PreferenceDataModule


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def datamodule(tokenizer, train=TRL, **kwargs) -> PreferenceDataModule:
    kwargs = {"val_fraction": 0.0, "batch_size": 2, "strict": True, **kwargs}
    dm = PreferenceDataModule(train=str(train), tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm


def test_datamodule_encodes_pairs_and_batches_chosen_first(tokenizer):
    dm = datamodule(tokenizer, val=str(TRL), max_length=64)
    eos = tokenizer.eos_token_id
    assert len(dm.train_pairs) == len(dm.val_pairs) == 5
    for (chosen, rejected), record in zip(dm.train_pairs, TRL_RECORDS):
        assert chosen == Encoded(ids(tokenizer, record.prompt), ids(tokenizer, record.chosen) + [eos])
        assert rejected == Encoded(ids(tokenizer, record.prompt), ids(tokenizer, record.rejected) + [eos])
        assert 2 not in chosen.prompt_ids + chosen.response_ids + rejected.response_ids  # no <unk>
    assert dm.truncation.truncated_prompts == 0
    batch = next(iter(dm.val_dataloader()))  # unshuffled: pairs 0 and 1
    direct = collate_pairs(dm.val_pairs[:2], tokenizer.pad_token_id)
    assert torch.equal(batch.input_ids, direct.input_ids)
    texts = [
        tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
        for row, mask in zip(batch.input_ids, batch.response_mask)
    ]
    assert texts == [TRL_RECORDS[0].chosen, TRL_RECORDS[1].chosen, TRL_RECORDS[0].rejected, TRL_RECORDS[1].rejected]
    assert batch.prompt_width == 8  # "what do you think of the lamp ?"
    assert batch.attention_mask[0].tolist()[:8] == [0] + [1] * 7  # the 7-token pizza prompt, left padded
    assert batch.attention_mask[2].tolist()[:8] == [0] + [1] * 7
    assert batch.response_mask[:, :8].sum() == 0
    assert len(next(iter(dm.train_dataloader())).input_ids) == 4


def test_datamodule_truncates_the_shared_prompt_and_counts_it(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="lit_p3o.data.preferences"):
        dm = datamodule(tokenizer, max_length=20)
    assert len(dm.train_pairs) == 5 and dm.val_pairs == [] and dm.val_dataloader() == []
    # row 2: 11 prompt tokens, chosen 10 + EOS, rejected 16 + EOS: both sides keep the same 3 prompt tokens
    soup = next(pair for pair in dm.train_pairs if len(pair[1].response_ids) == 17)
    assert soup[0].prompt_ids == soup[1].prompt_ids == ids(tokenizer, "my blog :")
    assert len(soup[0].response_ids) == 11
    assert (dm.truncation.examples, dm.truncation.truncated_prompts, dm.truncation.removed_tokens) == (5, 1, 8)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "preference data: 1 of 5 prompts truncated from the left (8 tokens removed)"
    ]
    for chosen, rejected in dm.train_pairs:
        assert len(chosen.prompt_ids) + max(len(chosen.response_ids), len(rejected.response_ids)) <= 20


@pytest.mark.parametrize("val_fraction", [0.0, 0.4])
def test_datamodule_response_too_long_strict_names_the_file_row(tokenizer, val_fraction):
    """Row 2's rejected response is 16 tokens + EOS; the error names it by its row in the file,
    also when a validation share is split off (the split happens after encoding)."""
    with pytest.raises(DataFormatError) as info:
        datamodule(tokenizer, max_length=17, val_fraction=val_fraction, strict=True)
    assert str(info.value) == (
        f"{TRL}: row 2: field `rejected`: response too long for max_length=17 "
        "(EOS included; a prompt token must fit too)"
    )


def test_datamodule_response_too_long_skipped(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        dm = datamodule(tokenizer, max_length=17, strict=False)
    assert sorted(len(r.response_ids) for _, r in dm.train_pairs) == [5, 5, 6, 6]  # row 2 is gone
    assert [r.getMessage() for r in caplog.records if r.name == DATA_LOG] == [
        f"skipped 1 of 5 rows of {TRL}: 1 × rejected: response too long for max_length=17 "
        "(EOS included; a prompt token must fit too) (rows 2)"
    ]


def test_datamodule_skips_are_named_by_their_row_in_the_source(tokenizer, tmp_path, caplog):
    rows = [
        {"prompt": "rate the tea :", "chosen": "it is good .", "rejected": "it is bad ."},
        {"prompt": "rate the tea :", "chosen": "it is good .", "rejected": "it is good ."},  # parser skips
        {"prompt": "rate the tea :", "chosen": "it is good . i like it . i would order it again .", "rejected": "no ."},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger=DATA_LOG):
        dm = datamodule(tokenizer, train=path, max_length=10, strict=False)
    assert len(dm.train_pairs) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == DATA_LOG]
    assert messages[0] == f"skipped 1 of 3 rows of {path}: 1 × chosen/rejected: identical responses (rows 1)"
    assert messages[1].startswith(f"skipped 1 of 2 rows of {path}: 1 × chosen: response too long")
    assert messages[1].endswith("(rows 2)")


def test_datamodule_conversational_with_chat_template(chat_tokenizer):
    dm = datamodule(chat_tokenizer, train=CONV, max_length=64, strict=False)
    expected = {tuple(ids(chat_tokenizer, r.prompt)): ids(chat_tokenizer, r.chosen) for r in CONV_RECORDS}
    assert {tuple(c.prompt_ids): c.response_ids[:-1] for c, _ in dm.train_pairs} == expected


def test_datamodule_rejects_bad_val_fraction(tokenizer):
    with pytest.raises(ValueError, match="val_fraction"):
        PreferenceDataModule(train=str(TRL), tokenizer=tokenizer, val_fraction=1.0)


@pytest.mark.parametrize(
    "field, value", [("batch_size", 0), ("batch_size", -2), ("max_length", 1), ("num_workers", -1)]
)
def test_datamodule_rejects_bad_sizes(tokenizer, field, value):
    """batch_size 0 was accepted (a multiple of every K-wise group size) and became one group per batch."""
    with pytest.raises(ValueError, match=rf"^PreferenceDataModule\.{field}: must be >= \d+.*got {value}$"):
        PreferenceDataModule(train=str(TRL), tokenizer=tokenizer, **{field: value})
