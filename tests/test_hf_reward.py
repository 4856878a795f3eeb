"""Reward models agree with transformers (issue 10, part 1): a reward model saved by lit-p3o
scores the same under plain ``AutoModelForSequenceClassification``, and one saved by
transformers/TRL scores in lit-p3o as under its own forward (without a pad token: as TRL
scores it, with the config's pad id set to EOS), for tokenizers without a pad
token, with pad = EOS and with a separate pad, under left and right padding, with prompts that
contain the EOS / end-of-turn token."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import ENDOFTEXT, EOT, gpt2_style_tokenizer, llama3_chat_tokenizer, save_model_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lit_p3o.data.encoding import Encoded, collate
from lit_p3o.models import ModelSpec, build_reward_model, load_tokenizer, save_pretrained
from lit_p3o.scoring import RewardScorer, pooling_positions, reward_scores

# (family, tokenizer builder): no pad, pad = EOS, separate pad
SETUPS = {
    "gpt2-no-pad": ("gpt2", lambda: gpt2_style_tokenizer()),
    "gpt2-pad-is-eos": ("gpt_neox", lambda: gpt2_style_tokenizer(pad="eos")),
    "llama3-no-pad": ("llama", lambda: llama3_chat_tokenizer()),
    "llama3-separate-pad": ("llama", lambda: llama3_chat_tokenizer(pad=True)),
}


def examples(tokenizer) -> list[Encoded]:
    """Rows of different lengths (so the batch pads both sides); some prompts hold EOS or the
    end-of-turn token, one response does not end, one is EOS alone."""
    eos = tokenizer.eos_token_id
    ids = lambda text, special=False: tokenizer(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    end_of_turn = tokenizer.convert_tokens_to_ids(EOT) if EOT in tokenizer.get_vocab() else eos
    return [
        Encoded(ids("Write a short review of the pizza.", True), ids(" The pizza is great.") + [eos]),
        Encoded(
            ids(f"The quick brown fox.{ENDOFTEXT if end_of_turn == eos else EOT} What is 12 + 7?", True),
            ids(" 19") + [eos],
        ),
        Encoded(
            ids("Hello!", True) + [end_of_turn, eos] + ids(" How are you?"),
            ids(" I would order it again.") + [end_of_turn],
        ),
        Encoded(ids("Summarize the post: my cat sleeps all day.", True), ids(" The cat plays")),  # did not end
        Encoded(ids("What is 3 + 4?", True), [eos]),  # an empty response
    ]


@torch.no_grad()
def transformers_scores(model, rows: list[Encoded]) -> torch.Tensor:
    """Plain transformers, one unpadded row at a time (its own pooling rule)."""
    return torch.stack([model(input_ids=torch.tensor([e.prompt_ids + e.response_ids])).logits[0, 0] for e in rows])


@pytest.mark.parametrize("setup", SETUPS)
def test_reward_model_trained_elsewhere_scores_as_under_its_own_forward(setup, tmp_path):
    family, build = SETUPS[setup]
    tokenizer = build()
    directory = save_model_dir(tmp_path / "rm", tokenizer, family, head="reward", head_scale=3.0)
    hf = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    assert hf.config.pad_token_id == tokenizer.pad_token_id  # None, EOS, or the separate pad
    had_pad = hf.config.pad_token_id is not None
    if not had_pad:  # no pad token: scored as TRL scores it, with the config's pad id set to EOS
        hf.config.pad_token_id = tokenizer.eos_token_id
    rows = examples(tokenizer)
    expected = transformers_scores(hf, rows)
    assert expected.unique().numel() == len(rows)

    scorer = RewardScorer.from_pretrained(directory, batch_size=8)
    assert scorer.tokenizer.pad_token_id is not None  # lit-p3o pads with EOS when there is no pad
    ours = scorer.score_examples(rows)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    batch = collate(rows, scorer.tokenizer.pad_token_id)
    assert (batch.attention_mask[:, 0] == 0).any() and (batch.attention_mask[:, -1] == 0).any()  # left and right
    for order in ([4, 3, 2, 1, 0], [2, 0]):  # other neighbours, other padding, same scores
        torch.testing.assert_close(
            scorer.score_examples([rows[i] for i in order]), expected[order], atol=1e-5, rtol=1e-5
        )
    if had_pad:  # transformers' own padded batch (right padding) agrees too
        padded = AutoTokenizer.from_pretrained(directory).pad(
            {"input_ids": [e.prompt_ids + e.response_ids for e in rows]}, return_tensors="pt"
        )
        with torch.no_grad():
            torch.testing.assert_close(hf(**padded).logits[:, 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setup", SETUPS)
def test_reward_model_saved_by_lit_p3o_scores_the_same_under_transformers(setup, tmp_path):
    family, build = SETUPS[setup]
    policy_dir = save_model_dir(tmp_path / "policy", build(), family)  # an SFT policy to start from
    spec = ModelSpec(name_or_path=str(policy_dir))
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    model = build_reward_model(spec, tokenizer).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 3.0)
    rows = examples(tokenizer)
    with torch.no_grad():
        ours = reward_scores(model, collate(rows, tokenizer.pad_token_id))  # the score RewardModule trains
    directory = save_pretrained(model, tokenizer, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    torch.testing.assert_close(transformers_scores(hf, rows), ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(RewardScorer.from_pretrained(directory).score_examples(rows), ours, atol=1e-5, rtol=1e-5)


def test_pooling_positions_by_hand():
    """Pad id 1 = EOS; rows left/right padded (mask 0). Row 0 ends with EOS: read the token
    before it; row 1 holds EOS mid-prompt and ends without it; row 2 is all EOS: its first
    attended token; without a pad id: the last attended token."""
    ids = torch.tensor([[1, 5, 6, 1, 1], [7, 1, 8, 9, 1], [1, 1, 1, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 0, 1, 1, 0]])
    assert pooling_positions(ids, mask, 1).tolist() == [2, 3, 2]
    assert pooling_positions(ids, mask, None).tolist() == [3, 3, 3]
    assert pooling_positions(ids, mask, 0).tolist() == [3, 3, 3]
