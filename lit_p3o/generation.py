"""Sampling responses and scoring their tokens: the two model calls every RL stage makes.

``sample_responses`` wraps ``generate()`` (KV cache on) and returns responses cut at the
first generated EOS; with ``SamplingSpec.compile`` it decodes through ``torch.compile`` and
transformers' static KV cache, with the same tokens for the same seed. ``response_logprobs`` is the *only* function that turns a batch into
per-token log-probs: the rollout (``logp_old``, ``logp_ref``), the updates and the evaluation
all call it, so at the first update step the trajectory ratio is 1 up to float error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch._dynamo.exc
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import CompileConfig, GenerationConfig, PreTrainedTokenizerBase

from lit_p3o.data.encoding import Batch, Encoded, collate
from lit_p3o.losses import token_logprobs

log = logging.getLogger(__name__)


@dataclass
class SamplingSpec:
    """Generation settings (defaults: plain sampling at temperature 1, as the paper).

    ``compile``: decode with ``torch.compile`` and a static KV cache (prompts left-padded to
    a power-of-two width, so a run compiles one graph per width bucket and batch size).
    ``"auto"`` turns it on where it pays off: on CUDA, not on CPU, where at this project's
    sizes the compile time exceeds what it saves over a run (docs/benchmarks.md); never with
    ``synced_gpus``. Same tokens as eager for the same seed; if compilation fails, a warning
    is logged and generation continues eagerly from the same RNG state.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    synced_gpus: bool = False
    compile: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSpec.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"SamplingSpec.temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k: must be >= 0 (0 = off), got {self.top_k}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"SamplingSpec.compile: true, false or 'auto', got {self.compile!r}")

    def compiled_on(self, device: torch.device) -> bool:
        """Whether generation on ``device`` takes the compiled path."""
        wanted = device.type == "cuda" and not self.synced_gpus if self.compile == "auto" else self.compile
        return bool(wanted) and not _compile_failed

    def generation_config(self, tokenizer: PreTrainedTokenizerBase, compiled: bool = False) -> GenerationConfig:
        """A config built from scratch so a model's own defaults (e.g. top_k=50) never leak in."""
        config = GenerationConfig(
            do_sample=True,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        if compiled:
            config.cache_implementation = "static"
            config.compile_config = _COMPILE_CONFIG
        return config


# transformers compiles the decode step itself when the cache is static, but only on
# accelerators unless this (documented-as-testing) flag is set: we decide the device policy.
_COMPILE_CONFIG = CompileConfig(fullgraph=False, dynamic=False)
_COMPILE_CONFIG._compile_all_devices = True
_compile_failed = False  # set after a failed compilation: the rest of the process stays eager


def bucket_width(width: int) -> int:
    """The padded prompt width the compiled path uses: the next power of two, at least 16."""
    return max(16, 1 << (width - 1).bit_length())


@dataclass
class Sampled:
    """Sampled responses: ids (EOS included when generated) and whether EOS was generated."""

    examples: list[Encoded]
    ended: list[bool]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for a block, then its previous mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    spec: SamplingSpec,
    batch_size: int | None = None,
    progress: str | None = None,
) -> Sampled:
    """Sample one response per prompt id list (repeat prompts for K responses each).

    ``generate()`` runs on chunks of ``batch_size`` prompts (all at once when None); a
    ``progress`` label shows a progress bar over the chunks.
    """
    size = batch_size or max(1, len(prompts))
    device = next(model.parameters()).device
    examples, ended = [], []
    with eval_mode(model):
        for start in tqdm(range(0, len(prompts), size), desc=progress, leave=False, disable=progress is None):
            chunk = prompts[start : start + size]
            batch = collate([Encoded(p) for p in chunk], tokenizer.pad_token_id)
            input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            generated = _generate(model, tokenizer, spec, input_ids, attention_mask)
            for prompt, row in zip(chunk, generated.tolist()):
                stop = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else None
                examples.append(Encoded(prompt, row[:stop] if stop else row))
                ended.append(stop is not None)
    return Sampled(examples, ended)


def _generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: SamplingSpec, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """The generated columns ``[B, ≤ max_new_tokens]`` of one ``generate()`` call."""
    global _compile_failed
    device = input_ids.device
    if spec.compiled_on(device):
        pad = bucket_width(input_ids.shape[1]) - input_ids.shape[1]  # bounded recompilation
        padded_ids = F.pad(input_ids, (pad, 0), value=tokenizer.pad_token_id)
        padded_mask = F.pad(attention_mask, (pad, 0), value=0)
        rng = _rng_state(device)
        try:
            out = model.generate(input_ids=padded_ids, attention_mask=padded_mask, synced_gpus=spec.synced_gpus,
                                 generation_config=spec.generation_config(tokenizer, compiled=True))
            return out[:, padded_ids.shape[1] :]
        except torch._dynamo.exc.TorchDynamoException as error:  # e.g. no C++ compiler for inductor
            log.warning("SamplingSpec.compile: compilation failed, generating eagerly from now on: %s", error)
            _compile_failed = True
            _set_rng_state(device, rng)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=spec.synced_gpus,
                         generation_config=spec.generation_config(tokenizer))
    return out[:, input_ids.shape[1] :]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def response_logprobs(model: nn.Module, batch: Batch) -> Tensor:
    """Per-token ``log π(y_t | x, y_<t)`` on response positions, float32, zero elsewhere.

    Shape ``[B, R]`` with ``R`` the batch's response width; only the logits that predict
    response tokens are computed (``logits_to_keep``), which skips the LM head on prompts.
    """
    return response_logprobs_and_states(model, batch, with_states=False)[0]


def response_logprobs_and_states(model: nn.Module, batch: Batch, with_states: bool = True) -> tuple[Tensor, Tensor | None]:
    """:func:`response_logprobs` plus the last hidden states that predict each response
    token, ``[B, R, H]`` (for value heads), from the same single forward pass."""
    width = batch.input_ids.shape[1] - batch.prompt_width
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width + 1,
        output_hidden_states=with_states,
        use_cache=False,
    )
    tokens = batch.input_ids[:, batch.prompt_width :]
    mask = batch.response_mask[:, batch.prompt_width :]
    logp = token_logprobs(out.logits[:, :-1], tokens) * mask
    states = out.hidden_states[-1][:, batch.prompt_width - 1 : -1] if with_states else None
    return logp, states


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Text of a response without special tokens (EOS, padding)."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
