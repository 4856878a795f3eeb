"""Rewards as Python (issue 10, part 5): ``package.module:function`` reward functions in TRL's
``reward_funcs`` form, weighted mixes with reward models, None/NaN through the non-finite
guard, prompt columns as keyword arguments, and the embedded verifiable "arithmetic" task."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from micro import MICRO_ARCH

from lit_p3o import GuardSpec, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.cli import LitP3OCLI
from lit_p3o.data.encoding import Encoded, encode_example
from lit_p3o.data.prompts import Prompt, load_prompts
from lit_p3o.errors import RewardFunctionError
from lit_p3o.models import build_reward_model, load_tokenizer, save_pretrained
from lit_p3o.scoring import FunctionScorer, RewardScorer, RewardSpec, WeightedScorer, build_scorer, load_function
from lit_p3o.tasks import arithmetic, get_task

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).stem  # this module, importable by name: its functions are reward sources
CALLS: list[dict] = []


def word_count(prompts, completions, **kwargs):
    """A reward function of the TRL kind; records what it was given."""
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [float(len(c.split())) for c in completions]


def none_for_long(prompts, completions, **kwargs):
    return [None if len(c.split()) > 4 else 1.0 for c in completions]


def always_none(prompts, completions, **kwargs):
    return [None] * len(completions)


def wrong_length(prompts, completions, **kwargs):
    return [1.0]


def text_values(prompts, completions, **kwargs):
    return ["high"] * len(completions)


def bool_values(prompts, completions, **kwargs):
    """Rewards of a verifier written as booleans: refused, not read as 1.0/0.0."""
    return [True] * len(completions)


NOT_CALLABLE = 3


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"))


def examples(tok, pairs):
    return [encode_example(tok, p, r, 64) for p, r in pairs]


PAIRS = [("rate the tea :", "it is good ."), ("rate the mug :", "i hate it . it is bad .")]


# --------------------------------------------------------------------------- FunctionScorer


def test_function_scorer_calls_like_trl_with_prompt_columns(tok):
    CALLS.clear()
    scorer = build_scorer(f"{HERE}:word_count", tok)
    assert isinstance(scorer, FunctionScorer)
    prompts = [Prompt("rate the tea :", {"answer": "7", "level": 1}), Prompt("rate the mug :", {"answer": "9"})]
    scores = scorer.score_examples(examples(tok, PAIRS), [True, True], prompts=prompts)
    assert scores.tolist() == [4.0, 8.0] and scores.dtype == torch.float32
    (call,) = CALLS
    assert call == {
        "prompts": ["rate the tea :", "rate the mug :"],
        "completions": ["it is good .", "i hate it . it is bad ."],  # EOS removed
        "answer": ["7", "9"],
        "level": [1, None],  # a column some rows lack is None there
    }
    CALLS.clear()  # without prompt texts: decoded from the ids, no columns
    scorer.score_examples(examples(tok, PAIRS), [True, True])
    assert CALLS == [
        {"prompts": ["rate the tea :", "rate the mug :"], "completions": ["it is good .", "i hate it . it is bad ."]}
    ]


def test_none_becomes_nan_and_bad_returns_are_named(tok):
    rows = examples(tok, PAIRS)
    scores = build_scorer(f"{HERE}:none_for_long", tok).score_examples(rows, [True, True])
    assert scores[0] == 1.0 and math.isnan(scores[1])
    with pytest.raises(
        ValueError,
        match=f"reward function {HERE}:wrong_length: must return one value per completion \\(2\\), got 1 values",
    ):
        build_scorer(f"{HERE}:wrong_length", tok).score_examples(rows, [True, True])
    with pytest.raises(
        RewardFunctionError, match=f"reward function {HERE}:text_values: value 0 is 'high'; expected a float or None"
    ):
        build_scorer(f"{HERE}:text_values", tok).score_examples(rows, [True, True])
    with pytest.raises(
        RewardFunctionError, match=f"reward function {HERE}:bool_values: value 0 is True; expected a float or None"
    ):
        build_scorer(f"{HERE}:bool_values", tok).score_examples(rows, [True, True])


def test_load_function_errors_name_the_source():
    assert load_function(f"{HERE}:word_count") is word_count
    with pytest.raises(
        RewardFunctionError, match="reward function no_such_module_x:f: cannot import module 'no_such_module_x'"
    ):
        load_function("no_such_module_x:f")
    with pytest.raises(RewardFunctionError, match=f"module '{HERE}' has no attribute 'missing'"):
        load_function(f"{HERE}:missing")
    with pytest.raises(RewardFunctionError, match="'NOT_CALLABLE' is not callable"):
        load_function(f"{HERE}:NOT_CALLABLE")


def test_weighted_mix_of_functions_and_a_reward_model(tok, tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")
    model = build_reward_model(spec, tok)
    with torch.no_grad():
        model.score.weight.normal_(0, 1)
    directory = save_pretrained(model, tok, tmp_path / "rm")
    rows = examples(tok, PAIRS)
    rm = RewardScorer.from_pretrained(directory).score_examples(rows)
    mixed = build_scorer(
        [RewardSpec(f"{HERE}:word_count", 0.5), RewardSpec(str(directory), -2.0), {"source": "embedded:reviews"}], tok
    )
    assert isinstance(mixed, WeightedScorer) and isinstance(mixed.model, torch.nn.ModuleList)
    gold = build_scorer("embedded:reviews", tok).score_examples(rows, [True, True])
    expected = 0.5 * torch.tensor([4.0, 8.0]) - 2.0 * rm + gold
    torch.testing.assert_close(mixed.score_examples(rows, [True, True]), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="RewardSpec.weight: must be finite"):
        RewardSpec("x:y", float("inf"))
    with pytest.raises(ValueError, match="needs at least one reward"):
        build_scorer([], tok)


def test_weighted_reward_gives_its_functions_the_prompt_columns(tok):
    CALLS.clear()
    mixed = build_scorer([RewardSpec(f"{HERE}:word_count", 2.0), RewardSpec("embedded:reviews", 0.0)], tok)
    prompts = [Prompt("rate the tea :", {"answer": "7"}), Prompt("rate the mug :", {"answer": "9"})]
    scores = mixed.score_examples(examples(tok, PAIRS), [True, True], prompts=prompts)
    assert scores.tolist() == [8.0, 16.0]
    (call,) = CALLS
    assert call["answer"] == ["7", "9"] and call["prompts"] == ["rate the tea :", "rate the mug :"]


# --------------------------------------------------------------------------- in an RL stage


def p3o(reward, prompts="embedded:reviews", guards=None, **rollout):
    L.seed_everything(0)
    kwargs = dict(
        prompts=prompts,
        prompt_pool=16,
        num_prompts=4,
        num_responses=2,
        update_epochs=1,
        minibatch_groups=4,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=4),
    )
    kwargs.update(rollout)
    tokenizer = prompts if prompts.startswith("embedded:") else "embedded:reviews"
    return P3OModule(
        ModelSpec(architecture=dict(MICRO_ARCH), tokenizer=tokenizer),
        reward,
        rollout=RolloutSpec(**kwargs),
        optimizer=OptimizerSpec(learning_rate=1e-2),
        guards=guards,
    )


def fit(stage, tmp_path, epochs=1):
    L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(stage)


def test_none_rewards_skip_the_update_through_the_guard(tmp_path):
    """No term applies (every function returned None): the reward is NaN, the update skipped."""
    stage = p3o(
        [RewardSpec(f"{HERE}:always_none"), RewardSpec(f"{HERE}:always_none", 0.5)],
        guards=GuardSpec(max_skipped_fraction=1.0),
    )
    before = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    fit(stage, tmp_path)
    assert stage.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in stage.policy.state_dict().items())


def test_rollout_gives_reward_functions_the_prompt_columns(tmp_path):
    CALLS.clear()
    rows = [{"prompt": f"rate the {item} :", "answer": item.upper()} for item in ("tea", "mug", "lamp", "bike")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = p3o(f"{HERE}:word_count", prompts=str(path), prompt_pool=None)
    fit(stage, tmp_path)
    (call,) = CALLS
    assert len(call["prompts"]) == 8  # 4 prompts x 2 responses, group-major
    for prompt, answer in zip(call["prompts"], call["answer"]):
        assert answer == prompt.split()[2].upper()
    scores = torch.cat([g.scores for g in stage.buffer.groups])
    assert scores.tolist() == [float(len(c.split())) for c in call["completions"]]


# --------------------------------------------------------------------------- the arithmetic task


def test_arithmetic_task_by_hand():
    task = get_task("arithmetic")
    assert arithmetic.answer("what is 12 + 7 ?") == 19 and arithmetic.answer("what is 3 - 9 ?") == -6
    with pytest.raises(ValueError, match="not a prompt of the task"):
        arithmetic.answer("what is 3 * 9 ?")
    train, test = set(task.prompts("train", 149)), set(task.prompts("test", 51))
    assert len(train) == 149 and len(test) == 51 and not train & test and len(train | test) == 200
    corpus = task.sft_corpus(1000)
    wrong = sum(int(r["completion"]) != arithmetic.answer(r["prompt"]) for r in corpus)
    assert 0.25 < wrong / 1000 < 0.35  # the noise RL has to fix
    assert all(abs(int(r["completion"]) - arithmetic.answer(r["prompt"])) <= 2 for r in corpus)
    tok = task.build_tokenizer()
    for r in corpus[:50]:
        assert tok.unk_token_id not in tok(f"{r['prompt']} {r['completion']}")["input_ids"]
    assert task.prompt_columns("what is 12 + 7 ?") == {"answer": "19"}
    assert arithmetic.exact_match(["p", "q", "r"], [" 19", "18", "5"], answer=["19", "19", None]) == [1.0, 0.0, None]
    assert task.gold_reward("what is 12 + 7 ?", "19", True) == 1.0
    assert task.gold_reward("what is 12 + 7 ?", "19", False) == 0.0
    (prompt,) = load_prompts("embedded:arithmetic", "test", 1)
    assert prompt.columns == {"answer": str(arithmetic.answer(prompt))}


def test_rlvr_rewards_are_exact_match_on_the_answers(tmp_path):
    stage = p3o("lit_p3o.tasks.arithmetic:exact_match", prompts="embedded:arithmetic", num_responses=4)
    tok = stage.tokenizer
    good = tok("19")["input_ids"] + [tok.eos_token_id]

    def answer_half(model, tokenizer, prompts, spec, batch_size=None, progress=None):  # half right, half wrong
        from lit_p3o.generation import Sampled

        out = []
        for i, ids in enumerate(prompts):
            right = tok(str(arithmetic.answer(tok.decode(ids))))["input_ids"] + [tok.eos_token_id]
            out.append(Encoded(ids, right if i % 2 == 0 else good if right != good else [tok.eos_token_id]))
        return Sampled(out, [True] * len(out))

    import lit_p3o.rollout as rollout_module

    original = rollout_module.sample_responses
    rollout_module.sample_responses = answer_half
    try:
        fit(stage, tmp_path)
    finally:
        rollout_module.sample_responses = original
    scores = torch.cat([g.scores for g in stage.buffer.groups])
    assert scores.tolist() == [1.0, 0.0] * (len(scores) // 2)


@pytest.mark.slow
def test_shipped_arithmetic_configs_run_a_step(tmp_path, monkeypatch):
    """configs/arithmetic: SFT then RLVR with P3O, each for one step, as shipped but tiny."""
    monkeypatch.setattr(sys, "argv", ["lit-p3o"])
    sft = [
        "fit",
        "--config",
        str(ROOT / "configs/arithmetic/sft.yaml"),
        "--trainer.max_steps",
        "1",
        "--trainer.callbacks",
        "[]",
        "--data.init_args.embedded_size",
        "32",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.init_args.save_dir",
        str(tmp_path / "sft"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    LitP3OCLI(args=sft)
    rl = [
        "fit",
        "--config",
        str(ROOT / "configs/arithmetic/p3o.yaml"),
        "--trainer.max_epochs",
        "1",
        "--model.init_args.policy.name_or_path",
        str(tmp_path / "sft"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
        "--model.init_args.rollout.num_prompts",
        "4",
        "--model.init_args.rollout.minibatch_groups",
        "4",
        "--model.init_args.rollout.update_epochs",
        "1",
        "--model.init_args.save_dir",
        str(tmp_path / "p3o"),
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli = LitP3OCLI(args=rl)
    assert cli.trainer.global_step == 1
    assert isinstance(cli.model.scorer, WeightedScorer)
    assert (tmp_path / "p3o" / "config.json").is_file()
    shipped = yaml.safe_load((ROOT / "configs/arithmetic/p3o.yaml").read_text())
    assert shipped["model"]["init_args"]["reward_model"] == [
        {"source": "lit_p3o.tasks.arithmetic:exact_match", "weight": 1.0}
    ]
