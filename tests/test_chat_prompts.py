"""Chat prompts for RL (issue 10, part 3): TRL's conversational prompt-only rows
``{"prompt": [messages]}`` are rendered with the tokenizer's chat template and the generation
prompt, ``chat_template_kwargs`` passed through, without doubling a template's BOS."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import write_jsonl
from hf_fixtures import LLAMA3_TEMPLATE, gpt2_style_tokenizer, llama3_chat_tokenizer, save_model_dir

from lit_p3o import EvaluationSpec, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.data.encoding import encode_prompt
from lit_p3o.data.formats import DataFormatError, parse_prompts
from lit_p3o.data.prompts import load_prompts
from lit_p3o.evaluation import FrontierCallback

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "Write a short review of the pizza."},
        {"role": "assistant", "content": "The pizza is great."},
        {"role": "user", "content": "Summarize the post: my cat sleeps all day."},
    ],
]
#: Llama-3's template plus a keyword of the kind Qwen3 has (``enable_thinking``).
THINKING_TEMPLATE = LLAMA3_TEMPLATE + "{% if add_generation_prompt and not enable_thinking %}<think></think>{% endif %}"


@pytest.fixture(scope="module")
def chat():
    return llama3_chat_tokenizer()


def test_conversational_prompts_render_with_the_generation_prompt_and_one_bos(chat):
    prompts = parse_prompts([{"prompt": c} for c in CONVERSATIONS], "prompts.jsonl", chat)
    assert prompts.row_numbers == [0, 1, 2]
    for messages, prompt in zip(CONVERSATIONS, prompts):
        full = chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert full.startswith(chat.bos_token) and full.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert prompt == full[len(chat.bos_token) :]
        ids = encode_prompt(chat, prompt)
        assert ids == chat(full, add_special_tokens=False)["input_ids"]  # what the template means
        assert ids.count(chat.bos_token_id) == 1 and ids[0] == chat.bos_token_id


def test_a_template_bos_is_kept_when_the_tokenizer_adds_none():
    tokenizer = gpt2_style_tokenizer()  # BOS = <|endoftext|>, never added by encoding
    tokenizer.chat_template = LLAMA3_TEMPLATE
    (prompt,) = parse_prompts([{"prompt": CONVERSATIONS[0]}], "p", tokenizer)
    assert prompt.startswith("<|endoftext|><|start_header_id|>user")
    assert encode_prompt(tokenizer, prompt)[0] == tokenizer.bos_token_id


def test_chat_template_kwargs_are_passed_through():
    tokenizer = llama3_chat_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    rows = [{"prompt": CONVERSATIONS[0]}]
    assert parse_prompts(rows, "p", tokenizer)[0].endswith("<think></think>")
    assert parse_prompts(rows, "p", tokenizer, chat_template_kwargs={"enable_thinking": True})[0].endswith("\n\n")


def test_load_prompts_reads_conversational_prompt_only_files(tmp_path, chat):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": c} for c in CONVERSATIONS])
    prompts = load_prompts(str(path), tokenizer=chat)
    assert prompts == list(parse_prompts([{"prompt": c} for c in CONVERSATIONS], "p", chat))
    assert load_prompts(str(path), tokenizer=chat, limit=2) == prompts[:2]
    # a preference file with explicit conversational prompts: its distinct prompts
    pairs = [
        {
            "prompt": c,
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
        for c in CONVERSATIONS + CONVERSATIONS[:1]
    ]
    assert load_prompts(str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), tokenizer=chat) == prompts


def test_bad_conversational_prompts_are_named(tmp_path, chat, caplog):
    rows = [{"prompt": CONVERSATIONS[0]}, {"prompt": CONVERSATIONS[2][:2]}, {"prompt": "plain text"}, {"prompt": []}]
    with pytest.raises(DataFormatError) as info:
        parse_prompts(rows, "prompts.jsonl", chat)
    assert str(info.value) == (
        "prompts.jsonl: row 1: field `prompt`: the last message is the assistant's; "
        "a prompt ends with the turn the model answers"
    )
    with caplog.at_level(logging.WARNING, logger="lit_p3o.data"):
        kept = parse_prompts(rows, "prompts.jsonl", chat, strict=False)
    assert kept.row_numbers == [0]
    assert "skipped 3 of 4 rows of prompts.jsonl" in caplog.text
    assert "prompt: expected a non-empty list of messages (rows 2, 3)" in caplog.text
    with pytest.raises(DataFormatError, match="this tokenizer has no chat template"):
        parse_prompts(rows, "prompts.jsonl", gpt2_style_tokenizer())
    with pytest.raises(DataFormatError, match="row 1: field `prompt`: expected text, got list"):
        parse_prompts([{"prompt": "a"}, {"prompt": CONVERSATIONS[0]}], "prompts.jsonl")


class LengthScorer:
    def score_examples(self, examples, ended, prompts=None):
        return torch.tensor([float(len(e.response_ids)) for e in examples])


def test_p3o_rolls_out_on_chat_prompts(tmp_path):
    """A Llama-3-style chat model, TRL conversational prompts, kwargs for the template: the
    rollout and the frontier evaluation draw the rendered prompts and one step is taken."""
    tokenizer = llama3_chat_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    model_dir = save_model_dir(tmp_path / "chat", tokenizer)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": c} for c in CONVERSATIONS])
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(name_or_path=str(model_dir)),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompts=str(path),
            prompt_pool=None,
            num_prompts=2,
            num_responses=2,
            update_epochs=1,
            minibatch_groups=2,
            max_prompt_tokens=64,
            sampling=SamplingSpec(max_new_tokens=4),
            chat_template_kwargs={"enable_thinking": True},
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )
    stage.scorer = LengthScorer()  # the embedded gold reward reads only the task's own prompts
    frontier = FrontierCallback(
        EvaluationSpec(prompts=str(path), split="train", num_prompts=2, sampling=SamplingSpec(max_new_tokens=4))
    )
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.extend(tokenizer.decode(g.prompt_ids) for g in module.buffer.groups)

    L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[frontier, Spy()],
    ).fit(stage)
    assert stage.trainer.global_step == 1
    rendered = set(
        parse_prompts(
            [{"prompt": c} for c in CONVERSATIONS], "p", tokenizer, chat_template_kwargs={"enable_thinking": True}
        )
    )
    assert seen and all(p.removeprefix(tokenizer.bos_token) in rendered for p in seen)
    assert all(p.endswith("assistant<|end_header_id|>\n\n") for p in seen)  # no <think></think>: kwargs used
    assert frontier._prompt_list == load_prompts(
        str(path), "train", 2, tokenizer, chat_template_kwargs={"enable_thinking": True}
    )
    assert len(frontier.rows) == 2  # start and end of fit


def test_sft_and_preference_data_render_prompts_as_the_rollout_does(tmp_path):
    """``chat_template_kwargs`` reach every conversational format, so that SFT, the reward
    model and the RL prompts put the same text before a reply (Qwen3's ``enable_thinking``)."""
    from lit_p3o.data.preferences import PreferenceDataModule
    from lit_p3o.data.sft import SFTDataModule

    tokenizer = llama3_chat_tokenizer(pad=True)
    tokenizer.chat_template = THINKING_TEMPLATE
    reply = [{"role": "assistant", "content": "Nineteen."}]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATIONS[0] + reply}])
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": CONVERSATIONS[0], "chosen": reply, "rejected": [{"role": "assistant", "content": "Twenty."}]}],
    )
    kwargs = {"enable_thinking": True}
    (rollout_prompt,) = parse_prompts([{"prompt": CONVERSATIONS[0]}], "p", tokenizer, chat_template_kwargs=kwargs)
    assert not rollout_prompt.endswith("<think></think>")
    expected = encode_prompt(tokenizer, rollout_prompt)

    def first_prompt_ids(data_module: type, source: Path, **kwargs) -> list[int]:
        module = data_module(train=str(source), val_fraction=0.0, tokenizer=tokenizer, **kwargs)
        module.setup("fit")
        examples = getattr(module, "train_examples", None) or [chosen for chosen, _ in module.train_pairs]
        return examples[0].prompt_ids

    for data_module, source in ((SFTDataModule, sft), (PreferenceDataModule, pairs)):
        assert first_prompt_ids(data_module, source, chat_template_kwargs=kwargs) == expected, data_module.__name__
        assert first_prompt_ids(data_module, source) != expected  # the kwargs made the difference


def test_sft_on_conversational_preferences_renders_with_the_kwargs():
    """The ``chosen`` SFT format passes ``chat_template_kwargs`` on to the preference parser."""
    from lit_p3o.data.formats import parse_chosen

    tokenizer = llama3_chat_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    rows = [
        {
            "prompt": CONVERSATIONS[0],
            "chosen": [{"role": "assistant", "content": "Nineteen."}],
            "rejected": [{"role": "assistant", "content": "Twenty."}],
        }
    ]
    (expected,) = parse_prompts(
        [{"prompt": CONVERSATIONS[0]}], "p", tokenizer, chat_template_kwargs={"enable_thinking": True}
    )
    (record,) = parse_chosen(rows, "pairs.jsonl", tokenizer, chat_template_kwargs={"enable_thinking": True})
    assert record.prompt == expected and record.completion == "Nineteen."
    assert parse_chosen(rows, "pairs.jsonl", tokenizer)[0].prompt != expected
