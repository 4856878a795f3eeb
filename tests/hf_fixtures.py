"""Hugging Face look-alikes built locally at test time (no hub): the tokenizers and model
directories users bring, in miniature.

- :func:`gpt2_style_tokenizer`: byte-level BPE, ``<|endoftext|>`` is BOS = EOS = UNK, no pad
  token (GPT-2, Pythia); ``pad="eos"`` gives the variant whose pad is its EOS (what TRL sets).
- :func:`llama3_chat_tokenizer`: byte-level BPE with Llama-3's special tokens, a BOS added by the
  post-processor, a chat template whose end-of-turn token ``<|eot_id|>`` differs from EOS
  ``<|end_of_text|>``, and optionally a separate pad token.
- :func:`save_model_dir`: a tiny model of a given family saved with its tokenizer and a
  ``generation_config.json`` (e.g. an EOS *list*), loadable by ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short review of the pizza. The pizza is great. I would order it again.",
    "What is 12 + 7? The answer is 19.",
    "Summarize the post: my cat sleeps all day and plays at night.",
    "Human: how do I bake bread? Assistant: Mix flour, water and yeast, then bake it.",
    "user assistant system: You are a helpful assistant. Hello! How are you today?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - = ?",
]

ENDOFTEXT = "<|endoftext|>"
BEGIN, END, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END, LLAMA_PAD = "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>"

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama-3's template, shortened: turns end with ``<|eot_id|>``, not with EOS."""

TINY_ARCH: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _byte_bpe(special_tokens: list[str], vocab_size: int = 400) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES, trainer)
    return backend


def gpt2_style_tokenizer(pad: str | None = None) -> PreTrainedTokenizerFast:
    """GPT-2-like: one special token for BOS/EOS/UNK, no BOS added; ``pad="eos"`` sets pad = EOS."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe([ENDOFTEXT]),
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
    )
    if pad == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def llama3_chat_tokenizer(pad: bool = False) -> PreTrainedTokenizerFast:
    """Llama-3-like: BOS prepended, EOS ``<|end_of_text|>``, turns end with ``<|eot_id|>``;
    ``pad=True`` sets the separate ``<|finetune_right_pad_id|>`` as pad token."""
    backend = _byte_bpe([BEGIN, END, HEADER_START, HEADER_END, EOT, LLAMA_PAD])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN} $A", pair=f"{BEGIN} $A {BEGIN} $B", special_tokens=[(BEGIN, backend.token_to_id(BEGIN))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BEGIN,
        eos_token=END,
        pad_token=LLAMA_PAD if pad else None,
        additional_special_tokens=[HEADER_START, HEADER_END, EOT],
        chat_template=LLAMA3_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerFast, model_type: str = "llama", **overrides: Any):
    """A config of ``model_type`` sized for tests, with the tokenizer's special ids."""
    kwargs = dict(TINY_ARCH, **overrides)
    if model_type == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    if model_type == "gpt2":
        kwargs = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 256, **overrides}
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def save_model_dir(
    directory: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    model_type: str = "llama",
    head: str = "causal",
    eos_token_id: int | list[int] | None = None,
    seed: int = 0,
    head_scale: float = 1.0,
) -> Path:
    """A seeded tiny model saved with its tokenizer, as a hub download would look.

    ``head="reward"`` saves a one-label sequence classifier whose score head is drawn with
    standard deviation ``head_scale`` (so scores differ visibly between positions);
    ``eos_token_id`` goes to ``generation_config.json`` (an int or a list, as Llama-3 ships).
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    if head == "reward":
        model = AutoModelForSequenceClassification.from_config(tiny_config(tokenizer, model_type, num_labels=1))
        with torch.no_grad():
            model.score.weight.normal_(0, head_scale)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, model_type))
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
