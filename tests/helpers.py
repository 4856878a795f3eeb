"""Helpers several test files share: JSONL files, a CPU trainer, a micro P3O stage, reward-model inputs and
references. Shared fixtures are in ``conftest.py``.

Model look-alikes of Hugging Face families live in ``hf_fixtures.py``, the micro architectures in ``micro.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from micro import MICRO_ARCH
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from lit_p3o import GuardSpec, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.data.encoding import Encoded
from lit_p3o.rollout import KLSpec
from lit_p3o.tasks.reviews import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, vocabulary

FAST_OPTIMIZER = OptimizerSpec(learning_rate=1e-2)
"""The micro stages' learning rate: large enough that a few updates visibly move the policy."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` one JSON object a line (UTF-8, non-ASCII kept as is) and return ``path``."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cpu_trainer(tmp_path: Path, max_epochs: int = 1, **kwargs: Any) -> L.Trainer:
    """A quiet one-process CPU trainer: no logger, progress bar or summary; no checkpoints unless asked."""
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def make_p3o_stage(
    policy: ModelSpec | None = None,
    *,
    guards: GuardSpec | None = None,
    kl: KLSpec | None = None,
    save_dir: Path | None = None,
    optimizer: OptimizerSpec | None = FAST_OPTIMIZER,
    **rollout_kwargs: Any,
) -> P3OModule:
    """A micro P3O stage on the embedded task: 4 prompts × 2 responses, 2 minibatches × 2 passes by default.

    ``rollout_kwargs`` override the :class:`RolloutSpec` fields.
    """
    kwargs: dict[str, Any] = dict(
        prompt_pool=32,
        num_prompts=4,
        num_responses=2,
        update_epochs=2,
        minibatch_groups=2,
        max_prompt_tokens=16,
        sampling=SamplingSpec(max_new_tokens=6),
    )
    kwargs.update(rollout_kwargs)
    return P3OModule(
        policy or ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=RolloutSpec(**kwargs),
        optimizer=None if optimizer is None else dataclasses.replace(optimizer),  # a stage's own copy
        save_dir=None if save_dir is None else str(save_dir),
        guards=guards,
        kl=kl,
    )


# --------------------------------------------------------------------------- reward models

PAIRS = [  # (prompt, chosen, rejected), with prompts and responses of different lengths
    ("write a review of the pizza :", "the pizza is very tasty . i would order it again .", "the pizza is stale ."),
    ("rate the bike :", "i would recommend the bike .", "it is flimsy ."),
    ("what do you think of the lamp for my blog ?", "i really like it .", "i hate the lamp . it is noisy ."),
]


def spec(tokenizer: str = "embedded:reviews") -> ModelSpec:
    """The micro model on ``tokenizer`` (the embedded task's by default)."""
    return ModelSpec(architecture=dict(MICRO_ARCH), tokenizer=tokenizer)


def encode(tokenizer, prompt, response, add_eos=True) -> Encoded:
    """``prompt`` with the tokenizer's special tokens, ``response`` without, EOS appended unless ``add_eos`` is false."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids, response_ids + ([tokenizer.eos_token_id] if add_eos else []))


@torch.no_grad()
def score_alone(model, example: Encoded) -> float:
    """The reference: the backbone on the unpadded row alone, the head at its final position."""
    ids = torch.tensor([example.prompt_ids + example.response_ids])
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.score(hidden[0, -1]).item()


def shuffled_tokenizer() -> PreTrainedTokenizerFast:
    """The task's words with the vocabulary in reverse order and the special tokens last, so
    that no id (EOS included) means the same as in the task's tokenizer."""
    vocab = {token: i for i, token in enumerate((*reversed(vocabulary()), *SPECIAL_TOKENS))}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,
    )
