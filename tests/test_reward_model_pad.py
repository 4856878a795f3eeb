"""Reward models from a base without a pad token (issue 25, part 2): saved with the pad id its
tokenizer is saved with, so plain transformers batch-scores them as lit-p3o does, and a model
given as a Python object scores as the same model loaded from its path."""

from __future__ import annotations

import lightning as L
import torch
from datasets import Dataset
from hf_fixtures import llama3_chat_tokenizer, save_model_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lit_p3o import ModelSpec, RewardModule, RewardScorer
from lit_p3o.data.encoding import collate, encode_example
from lit_p3o.data.preferences import PreferenceDataModule
from lit_p3o.scoring import reward_scores

PAIRS = [
    ("Write a short review of the pizza.", " The pizza is great.", " It is bad."),
    ("What is 12 + 7?", " 19", " The answer is 20."),
    ("Hello!", " How are you today?", " No."),
]


def texts(tokenizer):
    """The pairs' (prompt, response) rows as lit-p3o encodes them (response + EOS)."""
    return [encode_example(tokenizer, p, r, 64) for p, chosen, rejected in PAIRS for r in (chosen, rejected)]


def test_a_reward_model_from_a_base_without_pad_batch_scores_in_plain_transformers(tmp_path):
    tokenizer = llama3_chat_tokenizer()  # no pad token, as Llama-3 ships
    base = save_model_dir(tmp_path / "base", tokenizer)
    L.seed_everything(0)
    stage = RewardModule(ModelSpec(name_or_path=str(base)), save_dir=str(tmp_path / "rm"))
    rows = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    data = PreferenceDataModule(train=rows, val_fraction=0.0, max_length=64, batch_size=3)
    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(stage, datamodule=data)

    saved = AutoTokenizer.from_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.pad_token_id is not None and hf.config.pad_token_id == saved.pad_token_id
    examples = texts(saved)
    padded = saved.pad({"input_ids": [e.prompt_ids + e.response_ids for e in examples]}, return_tensors="pt")
    assert (padded["attention_mask"] == 0).any()  # a real batch, padded on the side it was saved with
    with torch.no_grad():
        plain = hf(**padded).logits[:, 0]
    ours = RewardScorer.from_pretrained(tmp_path / "rm").score_examples(examples)
    assert ours.unique().numel() == len(examples)
    torch.testing.assert_close(plain, ours, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the score the stage trained
        trained = reward_scores(stage.reward_model.eval(), collate(examples, stage.tokenizer.pad_token_id))
    torch.testing.assert_close(trained, ours, atol=1e-5, rtol=1e-5)


def test_a_reward_model_object_scores_as_its_path(tmp_path):
    tokenizer = llama3_chat_tokenizer()
    directory = save_model_dir(tmp_path / "rm", tokenizer, head="reward", head_scale=3.0)
    examples = texts(tokenizer)
    from_path = RewardScorer.from_pretrained(directory).score_examples(examples)
    assert from_path.unique().numel() == len(examples)
    model = AutoModelForSequenceClassification.from_pretrained(directory)  # eval mode, pad id None
    given = RewardScorer(model, AutoTokenizer.from_pretrained(directory)).score_examples(examples)
    torch.testing.assert_close(given, from_path, atol=1e-5, rtol=1e-5)

    def stage_scores(stage: RewardModule):
        with torch.no_grad():
            return reward_scores(stage.reward_model, collate(examples, stage.tokenizer.pad_token_id))

    model = AutoModelForSequenceClassification.from_pretrained(directory)
    as_object = stage_scores(RewardModule(model, tokenizer=AutoTokenizer.from_pretrained(directory)))
    torch.testing.assert_close(as_object, stage_scores(RewardModule(ModelSpec(name_or_path=str(directory)))))
    torch.testing.assert_close(as_object, from_path, atol=1e-5, rtol=1e-5)
