"""Sampling and training knobs users expect (issue 25, part 4): min_p, repetition_penalty and
generation_kwargs on SamplingSpec, ModelSpec.attn_implementation, the QLoRA optimizer, SFT
truncation, chat templates on evaluation prompts, no deprecation warnings of our own."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lit_p3o import OptimizerSpec, SamplingSpec
from lit_p3o.data.encoding import encode_prompt
from lit_p3o.generation import sample_responses
from lit_p3o.models import build_causal_lm, load_tokenizer

PROMPTS = ["write a review of the pizza :", "review the pasta :", "the soup ?"]


@pytest.fixture(scope="module")
def micro():
    """A seeded micro model and its tokenizer."""
    from micro import MICRO_ARCH

    from lit_p3o.models import ModelSpec

    spec = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    return build_causal_lm(spec, tokenizer).eval(), tokenizer


# --------------------------------------------------------------------------- SamplingSpec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_p": 1.0}, r"SamplingSpec\.min_p: must be in \[0, 1\)"),
        ({"min_p": -0.1}, r"SamplingSpec\.min_p: "),
        ({"repetition_penalty": 0.0}, r"SamplingSpec\.repetition_penalty: must be > 0"),
        ({"generation_kwargs": {"temperature": 0.5}}, r"generation_kwargs: 'temperature' is a SamplingSpec field"),
        ({"generation_kwargs": {"min_p": 0.1}}, r"generation_kwargs: 'min_p' is a SamplingSpec field"),
        ({"generation_kwargs": {"do_sample": False}}, r"generation_kwargs: 'do_sample' is set by lit-p3o"),
        ({"generation_kwargs": {"num_return_sequences": 2}}, r"'num_return_sequences' is set by lit-p3o"),
        ({"generation_kwargs": {"no_repeat_ngrams": 2}}, r"'no_repeat_ngrams' is not a transformers GenerationConfig"),
    ],
)
def test_sampling_spec_refuses_bad_knobs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSpec(**kwargs)


def test_sampling_knobs_reach_the_generation_config(micro_tokenizer):
    spec = SamplingSpec(min_p=0.1, repetition_penalty=1.3, generation_kwargs={"no_repeat_ngram_size": 3})
    config = spec.generation_config(micro_tokenizer)
    assert (config.min_p, config.repetition_penalty, config.no_repeat_ngram_size) == (0.1, 1.3, 3)
    assert SamplingSpec().generation_config(micro_tokenizer).min_p is None  # 0 = off, no processor


def test_min_p_near_one_samples_the_greedy_responses(micro):
    model, tokenizer = micro
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    greedy = [
        model.generate(
            input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id
        )[0, len(p) :].tolist()
        for p in prompts
    ]
    torch.manual_seed(0)
    plain = sample_responses(model, tokenizer, prompts, SamplingSpec(max_new_tokens=8, compile=False))
    torch.manual_seed(0)
    sharp = sample_responses(model, tokenizer, prompts, SamplingSpec(max_new_tokens=8, min_p=0.999, compile=False))
    assert [e.response_ids for e in plain.examples] != [
        g[: len(e.response_ids)] for e, g in zip(plain.examples, greedy)
    ]
    for e, g in zip(sharp.examples, greedy):
        assert e.response_ids == g[: len(e.response_ids)]


def test_generation_kwargs_reach_generate(micro):
    model, tokenizer = micro
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS for _ in range(4)]
    spec = SamplingSpec(max_new_tokens=12, compile=False, generation_kwargs={"no_repeat_ngram_size": 1})
    torch.manual_seed(0)
    out = sample_responses(model, tokenizer, prompts, spec)
    for prompt, e in zip(prompts, out.examples):
        assert len(set(prompt + e.response_ids)) == len(prompt + e.response_ids)  # no token twice


# --------------------------------------------------------------------------- ModelSpec.attn_implementation


def test_attn_implementation_reaches_built_and_loaded_models(micro_tokenizer, micro_model_dir):
    from micro import MICRO_ARCH

    from lit_p3o.models import ModelSpec, build_reward_model

    built = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews", attn_implementation="eager")
    assert build_causal_lm(built, micro_tokenizer).config._attn_implementation == "eager"
    assert build_reward_model(built, micro_tokenizer).config._attn_implementation == "eager"
    loaded = ModelSpec(name_or_path=str(micro_model_dir), attn_implementation="eager")
    assert build_causal_lm(loaded, micro_tokenizer).config._attn_implementation == "eager"
    default = ModelSpec(name_or_path=str(micro_model_dir))
    assert build_causal_lm(default, micro_tokenizer).config._attn_implementation == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_its_package_says_what_to_install(micro_tokenizer, micro_model_dir):
    from lit_p3o.models import ModelSpec

    spec = ModelSpec(name_or_path=str(micro_model_dir), attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"ModelSpec\.attn_implementation: 'flash_attention_2' needs the `flash-attn`"):
        build_causal_lm(spec, micro_tokenizer)


def test_attn_implementation_given_twice_is_refused():
    from lit_p3o.models import ModelSpec

    with pytest.raises(ValueError, match=r"ModelSpec\.attn_implementation: also given in `extra_kwargs`"):
        ModelSpec(name_or_path="x", attn_implementation="sdpa", extra_kwargs={"attn_implementation": "eager"})


# --------------------------------------------------------------------------- no deprecation warnings of our own


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_warns_nothing(micro_tokenizer, lora):
    """Build, train a step and generate with checkpointing on, every warning an error (but
    peft's own read of transformers' deprecated ``is_gradient_checkpointing``, which is not ours)."""
    import warnings

    import peft  # noqa: F401  (its import-time torch.jit deprecations are not ours either)
    from micro import MICRO_ARCH

    from lit_p3o.models import LoraSpec, ModelSpec

    spec = ModelSpec(
        architecture=dict(MICRO_ARCH),
        tokenizer="embedded:reviews",
        gradient_checkpointing=True,
        lora=LoraSpec() if lora else None,
    )
    ids = torch.tensor([encode_prompt(micro_tokenizer, PROMPTS[0])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = build_causal_lm(spec, micro_tokenizer)
        model(input_ids=ids, labels=ids).loss.backward()
        assert any(p.grad is not None for p in model.parameters())
        model.eval()
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=micro_tokenizer.pad_token_id)


# --------------------------------------------------------------------------- the QLoRA optimizer


def qlora_optimizer_spec():
    """The ``optimizer`` block of configs/peft/qlora.yaml as the stage gets it."""
    from pathlib import Path

    import yaml

    overlay = yaml.safe_load((Path(__file__).parents[1] / "configs/peft/qlora.yaml").read_text())
    return OptimizerSpec(**overlay["model"]["init_args"]["optimizer"])


def test_qlora_overlay_takes_paged_8bit_adamw_on_cuda_and_adamw_with_a_note_on_cpu(caplog):
    import logging

    import bitsandbytes as bnb
    import lightning as L
    from micro import MICRO_ARCH

    from lit_p3o import ModelSpec, SFTModule
    from lit_p3o.optim import configure_adamw

    spec = qlora_optimizer_spec()
    assert spec.name == "paged_adamw_8bit"
    module = SFTModule(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"), optimizer=spec)
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.INFO, logger="lit_p3o.optim"):
        assert type(configure_adamw(module, spec)["optimizer"]) is torch.optim.AdamW
    [note] = [r for r in caplog.records if r.name == "lit_p3o.optim"]
    assert note.levelno == logging.INFO and "paged_adamw_8bit is for CUDA; on cpu" in note.getMessage()
    module._device = torch.device("cuda", 0)  # where the model sits decides; no GPU needed to build the optimizer
    assert type(configure_adamw(module, spec)["optimizer"]) is bnb.optim.PagedAdamW8bit


def test_cpu_fallback_needs_a_bitsandbytes_name():

    with pytest.raises(ValueError, match=r"OptimizerSpec\.cpu_fallback: is for a bitsandbytes name"):
        OptimizerSpec(cpu_fallback=True)


# --------------------------------------------------------------------------- SFT rows longer than max_length

LONG = "it is great . " * 4  # 16 words + EOS


def sft_rows(tmp_path):
    import json

    rows = [{"prompt": "review the soup :", "completion": "the soup is bland ."}] * 3
    rows = [*rows, {"prompt": "review the pizza :", "completion": LONG}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_cuts_an_overlong_completion_at_its_end_with_the_labels_on_it(micro_tokenizer, tmp_path, caplog):
    import logging

    from lit_p3o import SFTDataModule
    from lit_p3o.data.encoding import IGNORE_INDEX, collate

    dm = SFTDataModule(train=str(sft_rows(tmp_path)), max_length=12, val_fraction=0.0, tokenizer=micro_tokenizer)
    with caplog.at_level(logging.INFO, logger="lit_p3o"):
        dm.setup("fit")
    [long] = [e for e in dm.train_examples if len(e.response_ids) > 6]
    full = micro_tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert long.response_ids == full[:11] and micro_tokenizer.eos_token_id not in long.response_ids  # the end cut
    assert long.prompt_ids == micro_tokenizer("review the pizza :", add_special_tokens=False)["input_ids"][-1:]
    assert (dm.truncation.truncated_responses, dm.truncation.removed_response_tokens) == (1, 17 - 11)
    [note] = [r for r in caplog.records if "responses truncated" in r.getMessage()]
    assert note.levelno == logging.INFO
    assert "1 of 4 responses truncated at the end, EOS included (6 tokens removed)" in note.getMessage()
    batch = collate(dm.train_examples, micro_tokenizer.pad_token_id)
    labels = batch.labels()[dm.train_examples.index(long)]
    assert labels[labels != IGNORE_INDEX].tolist() == full[:11]  # every kept response token trained, no prompt token
    assert len(long.prompt_ids) + len(long.response_ids) == 12


def test_sft_strict_keeps_the_error_for_an_overlong_completion(micro_tokenizer, tmp_path):
    from lit_p3o import SFTDataModule
    from lit_p3o.data.formats import DataFormatError

    dm = SFTDataModule(
        train=str(sft_rows(tmp_path)), max_length=12, val_fraction=0.0, strict=True, tokenizer=micro_tokenizer
    )
    with pytest.raises(
        DataFormatError, match=r"long\.jsonl \[train\]: row 3: field `completion`: response has 17 tokens"
    ):
        dm.setup("fit")


def test_sft_logs_how_many_completions_it_cut(micro_tokenizer, tmp_path):
    import lightning as L
    from micro import MICRO_ARCH

    from lit_p3o import ModelSpec, SFTDataModule, SFTModule

    dm = SFTDataModule(train=str(sft_rows(tmp_path)), max_length=12, val_fraction=0.0, batch_size=4)
    module = SFTModule(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, dm)
    assert trainer.callback_metrics["data/truncated_responses"].item() == 1


# --------------------------------------------------------------------------- plain-string prompts and chat templates

QUESTIONS = ["What is 12 + 7?", "Hello!"]


def thinking_template() -> str:
    """Llama-3's template plus a keyword of the kind Qwen3 has (``enable_thinking``)."""
    from hf_fixtures import LLAMA3_TEMPLATE

    return LLAMA3_TEMPLATE + "{% if add_generation_prompt and not enable_thinking %}<think>{% endif %}"


def test_listed_prompts_are_user_turns_when_the_tokenizer_has_a_chat_template(micro_tokenizer):
    from hf_fixtures import llama3_chat_tokenizer

    from lit_p3o.data.prompts import Prompt, load_prompts

    chat = llama3_chat_tokenizer()
    chat.chat_template = thinking_template()
    rendered = load_prompts([Prompt(QUESTIONS[0], {"answer": "19"}), QUESTIONS[1]], tokenizer=chat)
    for question, prompt in zip(QUESTIONS, rendered):
        full = chat.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        assert prompt == full.removeprefix(chat.bos_token)  # encoding adds the BOS once
    assert rendered[0].columns == {"answer": "19"}  # a reward function's columns survive
    kwargs = {"enable_thinking": True}
    assert not load_prompts(QUESTIONS, tokenizer=chat, chat_template_kwargs=kwargs)[0].endswith("<think>")
    assert load_prompts(QUESTIONS, tokenizer=micro_tokenizer) == QUESTIONS  # no template: as written


def test_evaluation_prompts_render_as_the_rollout_s(tmp_path):
    """validate/test/predict draw a stage's plain-string evaluation prompts through the same
    function, template and kwargs as its rollout's."""
    from hf_fixtures import llama3_chat_tokenizer, save_model_dir

    from lit_p3o import EvaluationSpec, ModelSpec, P3OModule, RolloutSpec
    from lit_p3o.data.prompts import load_prompts

    tokenizer = llama3_chat_tokenizer()
    tokenizer.chat_template = thinking_template()
    model_dir = save_model_dir(tmp_path / "chat", tokenizer)
    kwargs = {"enable_thinking": True}
    stage = P3OModule(
        ModelSpec(name_or_path=str(model_dir)),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompts=QUESTIONS, prompt_pool=None, num_prompts=2, max_prompt_tokens=64, chat_template_kwargs=kwargs
        ),
        evaluation=EvaluationSpec(prompts=QUESTIONS, num_prompts=None, max_prompt_tokens=64),
    )
    rollout_prompts = load_prompts(QUESTIONS, "train", None, stage.tokenizer, chat_template_kwargs=kwargs)
    assert all(p.endswith("assistant<|end_header_id|>\n\n") for p in rollout_prompts)
    assert [p for batch in stage.test_dataloader() for p in batch] == rollout_prompts
    assert [p for batch in stage.predict_dataloader() for p in batch] == rollout_prompts


# --------------------------------------------------------------------------- errors name the config path


@pytest.mark.parametrize(
    ("init_args", "build", "path"),
    [
        ({"rollout": {"sampling": {"min_p": 1.5}}}, lambda: SamplingSpec(min_p=1.5), "rollout.sampling.min_p"),
        (
            {"rollout": {"sampling": {"generation_kwargs": {"do_sample": False}}}},
            lambda: SamplingSpec(generation_kwargs={"do_sample": False}),
            "rollout.sampling.generation_kwargs",
        ),
        ({"optimizer": {"cpu_fallback": True}}, lambda: OptimizerSpec(cpu_fallback=True), "optimizer.cpu_fallback"),
    ],
)
def test_knob_errors_name_their_config_path(init_args, build, path):
    from lit_p3o.errors import locate

    config = {"model": {"class_path": "lit_p3o.P3OModule", "init_args": {"policy": {"name_or_path": "x"}, **init_args}}}
    with pytest.raises(ValueError) as err:
        build()
    assert locate(str(err.value), config).startswith(f"model.init_args.{path}: ")
