"""Shared fixtures: a micro Llama (~17k parameters) on the embedded task's tokenizer; that tokenizer alone,
with and without a chat template."""

from __future__ import annotations

import os

# One intra-op thread per process, set before torch is imported and inherited by every subprocess
# the tests start: the micro models gain nothing from a second thread, whose OpenMP waiting cost
# 10-30x the CPU of the work itself on a busy 2-core machine (an SFT step of the 64-wide model:
# 0.4-0.9 CPU-s on 2 threads, 0.03 on 1). A value already in the environment is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from micro import MICRO_ARCH, WIDE_ARCH


@pytest.fixture
def micro_spec():
    """A fresh ModelSpec that builds the micro model from ``architecture``."""
    from lit_p3o.models import ModelSpec

    return ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")


@pytest.fixture(scope="session")
def micro_tokenizer():
    from lit_p3o.models import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"))


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory, micro_tokenizer):
    """A directory written by ``save_pretrained`` holding a seeded micro model and its tokenizer."""
    import torch

    from lit_p3o.models import ModelSpec, build_causal_lm, save_pretrained

    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"), micro_tokenizer)
    return save_pretrained(model, micro_tokenizer, tmp_path_factory.mktemp("micro") / "model")


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory, micro_tokenizer):
    """Like ``micro_model_dir`` for the two-layer, 64-wide model (4-bit tests need whole blocks)."""
    import torch

    from lit_p3o.models import ModelSpec, build_causal_lm, save_pretrained

    torch.manual_seed(0)
    model = build_causal_lm(ModelSpec(architecture=dict(WIDE_ARCH), tokenizer="embedded:reviews"), micro_tokenizer)
    return save_pretrained(model, micro_tokenizer, tmp_path_factory.mktemp("wide") / "model")


REVIEWS_CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
"""Renders ``<role> content`` lines in the embedded task's words, ending with ``<assistant>``."""


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded task's word-level tokenizer (no chat template)."""
    from lit_p3o.tasks import get_task

    return get_task("reviews").build_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The embedded task's tokenizer with :data:`REVIEWS_CHAT_TEMPLATE` (a module's own fixture of this name wins)."""
    from lit_p3o.tasks import get_task

    chat = get_task("reviews").build_tokenizer()
    chat.chat_template = REVIEWS_CHAT_TEMPLATE
    return chat
