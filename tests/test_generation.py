"""lit_p3o.generation. Responses stop where the model's generation_config says (issue 10, part 2): every id of its
EOS list (Llama-3's end-of-turn token), optional stop strings; masks, the missing-EOS penalty
and the ``ended`` flags follow the same rule. The context limit, and sampling at a temperature."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import make_p3o_stage as make_stage
from hf_fixtures import EOT, gpt2_style_tokenizer, llama3_chat_tokenizer, save_model_dir
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from lit_p3o import ModelSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.data.encoding import Encoded, encode_prompt
from lit_p3o.generation import (
    check_fits_context,
    context_limit,
    response_end,
    sample_responses,
    seeded,
    stop_token_ids,
)
from lit_p3o.models import load_tokenizer
from lit_p3o.rollout import rollout

PROMPTS = ["Write a short review of the pizza.", "What is 12 + 7?", "Hello!", "Summarize the post: my cat sleeps."]


def bias_head(model: nn.Module, boosts: dict[int, float]) -> None:
    """Replace the LM head by its own weights plus a bias that favours some ids."""
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight * 4)  # peakier than the random init, so texts vary
        head.bias.zero_()
        for token, value in boosts.items():
            head.bias[token] = value
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A Llama-3-style model whose generation_config lists EOS and ``<|eot_id|>``."""
    tokenizer = llama3_chat_tokenizer()
    eot = tokenizer.convert_tokens_to_ids(EOT)
    return save_model_dir(
        tmp_path_factory.mktemp("chat") / "model", tokenizer, eos_token_id=[tokenizer.eos_token_id, eot]
    )


def test_stop_token_ids_take_the_tokenizer_eos_and_the_generation_config_list(chat_dir):
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(chat_dir)))
    model = AutoModelForCausalLM.from_pretrained(chat_dir)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, eot]
    model.generation_config = GenerationConfig(eos_token_id=eot)  # an int
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, eot]
    model.generation_config = GenerationConfig()  # none listed
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    assert stop_token_ids(nn.Linear(1, 1), tokenizer) == [tokenizer.eos_token_id]  # no generation_config


def test_response_end_by_hand():
    tok = gpt2_style_tokenizer()
    ids = tok(" The pizza is great. I would order it again.", add_special_tokens=False)["input_ids"]
    dot = tok.convert_tokens_to_ids(".")
    first_dot = ids.index(dot) + 1
    assert ids.count(dot) == 2 and first_dot < len(ids)
    assert response_end(ids, [0], tok) is None  # never stops
    assert response_end(ids, [0, dot], tok) == first_dot  # the first listed id, included
    assert response_end(ids + [0], [0], tok) == len(ids) + 1
    assert response_end(ids, [0], tok, ["."]) == first_dot  # the same stop by string
    assert tok.decode(ids[: response_end(ids, [0], tok, ["great"])]).endswith("great")
    spanning = response_end(ids, [0], tok, ["s gr"])  # across tokens: ends at the token that completes it
    assert "s gr" in tok.decode(ids[:spanning]) and "s gr" not in tok.decode(ids[: spanning - 1])
    assert tok.decode(ids[:spanning]).startswith(" The pizza is gr")
    eos_first = ids[:2] + [0] + ids[2:]
    assert response_end(eos_first, [0], tok, ["."]) == 3  # whichever comes first
    assert response_end(ids, [0], tok, ["zzz", "order"]) == next(
        n for n in range(1, len(ids) + 1) if "order" in tok.decode(ids[:n])
    )


@pytest.mark.parametrize("listed", ["eot", "dot"])
def test_sampling_stops_where_hf_generate_stops(chat_dir, listed):
    """The issue's case: ``eos_token_id=[eos, "."]`` (or Llama-3's ``<|eot_id|>``) in the
    model's generation_config; lit-p3o's responses equal ``generate()`` under the model's own
    config with the same seed, and none runs past a listed id."""
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(chat_dir)))
    stop = tokenizer.convert_tokens_to_ids(EOT if listed == "eot" else ".")
    model = AutoModelForCausalLM.from_pretrained(chat_dir).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    bias_head(model, {stop: 3.0})
    prompt_ids = [encode_prompt(tokenizer, p) for p in PROMPTS for _ in range(5)]
    spec = SamplingSpec(max_new_tokens=12)
    torch.manual_seed(0)
    ours = sample_responses(model, tokenizer, prompt_ids, spec)
    assert sum(ours.ended) >= 5 and not all(ours.ended)
    for e, ended in zip(ours.examples, ours.ended):
        assert ended == (e.response_ids[-1] in (tokenizer.eos_token_id, stop))
        assert stop not in e.response_ids[:-1] and tokenizer.eos_token_id not in e.response_ids[:-1]
    assert any(e.response_ids[-1] == stop for e in ours.examples)

    # transformers with the model's own generation_config (the EOS list), same seed
    from lit_p3o.data.encoding import collate

    batch = collate([Encoded(p) for p in prompt_ids], tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=12,
            pad_token_id=tokenizer.pad_token_id,
        )
    for e, row in zip(ours.examples, out[:, batch.prompt_width :].tolist()):
        assert row[: len(e.response_ids)] == e.response_ids
        rest = row[len(e.response_ids) :]
        assert all(t == tokenizer.pad_token_id for t in rest)  # generate stopped there too


def test_stop_strings_end_responses(chat_dir):
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(chat_dir)))
    model = AutoModelForCausalLM.from_pretrained(chat_dir).eval()
    bias_head(model, {})
    prompt_ids = [encode_prompt(tokenizer, p) for p in PROMPTS for _ in range(4)]
    torch.manual_seed(0)
    plain = sample_responses(model, tokenizer, prompt_ids, SamplingSpec(max_new_tokens=16))
    texts = [tokenizer.decode(e.response_ids) for e in plain.examples]
    stop = next(c for c in "aeost" if sum(c in t for t in texts) >= 3)  # a letter several responses write
    torch.manual_seed(0)
    stopped = sample_responses(model, tokenizer, prompt_ids, SamplingSpec(max_new_tokens=16, stop_strings=[stop]))
    n_stopped = 0
    for before, after, ended, was_ended in zip(plain.examples, stopped.examples, stopped.ended, plain.ended):
        text = tokenizer.decode(after.response_ids)
        if stop in tokenizer.decode(before.response_ids[: len(before.response_ids) - was_ended]):
            n_stopped += 1
            assert ended and text.count(stop) >= 1 and stop not in tokenizer.decode(after.response_ids[:-1])
        else:  # untouched: same ids, same flag
            assert after.response_ids == before.response_ids and ended == was_ended
    assert n_stopped >= 3
    with pytest.raises(ValueError, match="stop_strings"):
        SamplingSpec(stop_strings=[""])


class ZeroScorer:
    def score_examples(self, examples, ended, prompts=None):
        return torch.zeros(len(examples))


def test_rollout_masks_penalty_and_ended_follow_the_eos_list(chat_dir):
    """In the rollout a response that ends with ``<|eot_id|>`` counts as ended (no missing-EOS
    penalty), its end-of-turn token is a scored response token, and nothing follows it."""
    torch.manual_seed(0)
    stage = P3OModule(
        ModelSpec(name_or_path=str(chat_dir)),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompts="embedded:reviews",
            prompt_pool=8,
            num_prompts=4,
            num_responses=4,
            max_prompt_tokens=64,
            sampling=SamplingSpec(max_new_tokens=8),
            missing_eos_penalty=2.0,
        ),
    )
    eot = stage.tokenizer.convert_tokens_to_ids(EOT)
    bias_head(stage.policy, {eot: 3.0})
    stage.reference.copy.set_output_embeddings(stage.policy.get_output_embeddings())
    stage.scorer = ZeroScorer()
    groups = rollout(stage, PROMPTS, beta=0.0, spec=stage.rollout_spec)
    flags = [(r, bool(e), float(s)) for g in groups for r, e, s in zip(g.responses, g.ended, g.scores)]
    assert any(r[-1] == eot for r, _, _ in flags) and any(not e for _, e, _ in flags)
    for response, ended, score in flags:
        assert ended == (response[-1] == eot or response[-1] == stage.tokenizer.eos_token_id)
        assert score == (0.0 if ended else -2.0)
        assert eot not in response[:-1]
    for g in groups:
        for response, old in zip(g.responses, g.logp_old):
            assert old.shape == (len(response),) and old[-1] < 0  # the stop token is scored


# --------------------------------------------------------------------------- context and temperature


def test_context_limit_falls_back_to_the_tokenizer():
    stage = make_stage()
    assert context_limit(stage.policy, stage.tokenizer) == (64, "max_position_embeddings of its config")
    no_positions = nn.Linear(1, 1)  # a model whose config says nothing
    tokenizer = copy.copy(stage.tokenizer)
    assert context_limit(no_positions, tokenizer) is None  # model_max_length not set either
    tokenizer.model_max_length = 20
    assert context_limit(no_positions, tokenizer) == (20, "model_max_length of its tokenizer")
    with pytest.raises(ValueError, match=r"EvaluationSpec\.max_prompt_tokens: 16 .* context of 20 \(model_max_length"):
        check_fits_context(no_positions, tokenizer, "EvaluationSpec", 16, "EvaluationSpec.sampling", 8)


def test_the_sampler_draws_from_softmax_of_the_logits_over_the_temperature():
    """A head that ignores the context and gives tokens a, b logits 1 and 0 (everything else,
    EOS included, -30): the sampled share of a follows softmax(z/T), not the spec object."""
    stage = make_stage()
    a, b = [i for i in range(len(stage.tokenizer)) if i not in stage.tokenizer.all_special_ids][:2]
    head = nn.Linear(stage.policy.config.hidden_size, len(stage.tokenizer), bias=True)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, -30.0)
    head.bias.data[a], head.bias.data[b] = 1.0, 0.0
    stage.policy.lm_head = head
    ids = [stage.tokenizer.encode("it is")] * 64

    def sample(t: float, seed: int = 0) -> torch.Tensor:
        with seeded(seed):
            out = sample_responses(stage.policy, stage.tokenizer, ids, SamplingSpec(max_new_tokens=8, temperature=t))
        return torch.tensor([e.response_ids for e in out.examples])  # [64, 8]: nothing ends early

    low = sample(0.05)
    assert (low == a).all()  # T → 0: the argmax
    for t in (0.5, 1.0):
        tokens = sample(t)
        assert set(tokens.unique().tolist()) == {a, b}
        share, expected = float((tokens == a).float().mean()), 1 / (1 + math.exp(-1 / t))  # 0.88, 0.73
        assert abs(share - expected) < 0.05, (t, share, expected)  # 512 draws: 0.05 is > 2.5 standard errors
    assert not torch.equal(sample(0.7), sample(1.0))  # the same seed, other temperatures
